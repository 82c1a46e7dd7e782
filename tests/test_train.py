"""train.py end to end on a tiny espeak-ng corpus: checkpoints, exact resume, DDP, torch.compile, config errors, NaN stop."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

@pytest.fixture(scope='session')
def train_corpus(tmp_path_factory):
    """16 training, 4 val and 4 test utterances of the grammar corpus."""
    from synth import synth_corpus
    out = tmp_path_factory.mktemp('train_corpus')
    synth_corpus(str(out), 'grammar', n_train=16, n_val=4, n_test=4, seed=7, workers=1)
    return str(out)

def tiny(corpus, out_dir, **kw):
    """--key=value arguments for a tiny model that trains in seconds."""
    args = dict(out_dir=str(out_dir), train_manifest=f'{corpus}/train.jsonl', val_manifest=f'{corpus}/val.jsonl',
                vocab_size=48, n_audio_state=32, n_audio_head=2, n_audio_layer=1, n_text_state=32, n_text_head=2,
                n_text_layer=1, n_text_ctx=64, batch_size=4, max_iters=4, eval_interval=100, log_interval=1,
                warmup_iters=2, learning_rate=3e-3, val_max_utts=4, eval_batch_size=4, device='cpu')
    args.update(kw)
    return [f'--{k}={v}' for k, v in args.items()]

def run(args, nproc=0, check=True):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONHASHSEED='0')
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}'] if nproc
           else [sys.executable]) + ['train.py'] + args
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p

def log(out_dir, key='loss'):
    with open(os.path.join(out_dir, 'log.jsonl')) as f:
        return [r[key] for r in map(json.loads, f) if key in r]

def test_train_writes_checkpoint_that_evaluate_reads(train_corpus, tmp_path):
    out = tmp_path / 'out'
    p = run(tiny(train_corpus, out, eval_interval=2, ctc_weight=0.3, conv_stride=4,
                 always_save_checkpoint=True,
                 test_manifest=f'{train_corpus}/test.jsonl'))
    assert 'iter 4: loss' in p.stdout and 'val WER' in p.stdout and 'audio-s/s' in p.stdout
    assert 'WER' in p.stdout.split('saved checkpoint')[-1]  # the test table at the end
    ckpt = torch.load(out / 'ckpt.pt', map_location='cpu', weights_only=True)
    assert ckpt['iter_num'] == 4 and set(ckpt) >= {'model', 'optimizer', 'model_args', 'best_val_wer', 'config', 'tokenizer'}
    assert ckpt['model_args']['conv_stride'] == 4 and ckpt['model_args']['ctc']
    assert not os.path.exists(out / 'ckpt.pt.tmp')
    from evaluate import load_checkpoint
    model, tokenizer, _ = load_checkpoint(str(out / 'ckpt.pt'))
    assert model.ctc_head is not None and tokenizer.n_vocab == model.dims.n_vocab
    assert len(log(out)) == 4 and len(log(out, 'val_wer')) == 2 and len(log(out, 'test_wer')) == 1
    e = subprocess.run([sys.executable, 'evaluate.py', f'--ckpt={out}/ckpt.pt', f'--manifest={train_corpus}/test.jsonl',
                        f'--out={tmp_path}/res.json'], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert e.returncode == 0, e.stderr
    assert json.load(open(tmp_path / 'res.json'))['utterances'] == 4

def test_resume_is_bit_exact(train_corpus, tmp_path):
    # dropout, token noise and an epoch boundary (4 batches an epoch) all cross the resume point
    kw = dict(dropout=0.1, token_noise=0.3, ctc_weight=0.5, max_iters=8, lr_decay_iters=8)  # the first half stops early on the same schedule
    run(tiny(train_corpus, tmp_path / 'straight', **kw))
    run(tiny(train_corpus, tmp_path / 'split', **dict(kw, max_iters=5)))
    run(tiny(train_corpus, tmp_path / 'split', **dict(kw, init_from='resume')))
    a = torch.load(tmp_path / 'straight' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'split' / 'ckpt.pt', weights_only=True)
    assert a['iter_num'] == b['iter_num'] == 8 and a['loader'] == b['loader']
    for k in a['model']:
        assert torch.equal(a['model'][k], b['model'][k]), k
    for sa, sb in zip(a['optimizer']['state'].values(), b['optimizer']['state'].values()):
        assert torch.equal(sa['exp_avg'], sb['exp_avg']) and torch.equal(sa['exp_avg_sq'], sb['exp_avg_sq'])
    assert log(tmp_path / 'straight') == log(tmp_path / 'split')

@pytest.mark.slow
def test_ddp_matches_one_process(train_corpus, tmp_path):
    # the same global batch: 2 processes x 2 utterances vs 1 process x 2 utterances x 2 accumulation steps
    kw = dict(batch_size=2, gradient_accumulation_steps=2, max_iters=6, ctc_weight=0.3)
    run(tiny(train_corpus, tmp_path / 'one', **kw))
    p = run(tiny(train_corpus, tmp_path / 'two', **kw), nproc=2)
    assert '2 process(es)' in p.stdout
    one, two = log(tmp_path / 'one'), log(tmp_path / 'two')
    assert len(one) == len(two) == 6
    assert one == pytest.approx(two, rel=1e-4, abs=1e-5)
    a = torch.load(tmp_path / 'one' / 'ckpt.pt', weights_only=True)['model']
    b = torch.load(tmp_path / 'two' / 'ckpt.pt', weights_only=True)['model']
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)

@pytest.mark.slow
def test_compile(train_corpus, tmp_path):
    p = run(tiny(train_corpus, tmp_path / 'c', compile=True, max_iters=3, ctc_weight=0.3))
    assert 'iter 3: loss' in p.stdout
    ckpt = torch.load(tmp_path / 'c' / 'ckpt.pt', weights_only=True)
    assert not any(k.startswith(('_orig_mod', 'module', 'model.')) for k in ckpt['model'])  # the plain Whisper keys

def test_config_errors(tmp_path):
    p = run(['--no_such_key=1'], check=False)
    assert p.returncode != 0 and 'unknown config key: no_such_key' in p.stderr
    p = run(['--batch_size=lots'], check=False)
    assert p.returncode != 0 and '--batch_size: expected int, got str' in p.stderr
    cfg = tmp_path / 'bad.py'
    cfg.write_text('learning_rate = 1e-3\nlearnin_rate = 2e-3\n')
    p = run([str(cfg)], check=False)
    assert p.returncode != 0 and 'unknown config key(s) learnin_rate' in p.stderr

@pytest.mark.parametrize('eval_interval,which', [(100, 'non-finite loss (ce nan'), (1, 'non-finite val loss')])
def test_nan_loss_stops_without_saving(train_corpus, tmp_path, eval_interval, which):
    # lr 1e30 blows the weights up in one step: the next training loss (or the val loss evaluated before it) is NaN
    out = tmp_path / 'nan'
    p = run(tiny(train_corpus, out, learning_rate=1e30, warmup_iters=0, eval_interval=eval_interval, max_iters=5), check=False)
    assert p.returncode != 0
    assert 'iter 1: ' + which in p.stderr, p.stderr
    assert not os.path.exists(out / 'ckpt.pt')

def test_student_base_row_then_td_keeps_what_is_frozen(train_corpus, tmp_path):
    """The distillation student's supervised rows: a smaller student of a checkpoint (its encoder
    and embeddings frozen, dropout, token noise, bf16 on CPU), the best val WER's weights; then a
    run from that student keeps its frozen parts."""
    run(tiny(train_corpus, tmp_path / 'teacher', n_text_layer=2, max_iters=2))
    kw = dict(init_from=f'{tmp_path}/teacher/ckpt.pt', student_layers=1, freeze_embeddings=True,
              token_noise=0.3, dropout=0.1, cpu_bf16=True, max_iters=4, eval_interval=1)
    run(tiny(train_corpus, tmp_path / 'base', **kw))
    t = torch.load(tmp_path / 'teacher' / 'ckpt.pt', weights_only=True)
    b = torch.load(tmp_path / 'base' / 'ckpt.pt', weights_only=True)
    assert b['model_args']['n_text_layer'] == 1 and b['model_args']['dropout'] == 0.1
    frozen = set(b['frozen'])
    assert {k for k in b['model'] if k.startswith('encoder.blocks')} <= frozen  # (not its buffer)
    assert {'decoder.token_embedding.weight', 'decoder.positional_embedding'} <= frozen
    assert not any(k.startswith('decoder.blocks') for k in frozen)
    for k in frozen:
        assert torch.equal(b['model'][k], t['model'][k]), k
    assert not torch.equal(b['model']['decoder.blocks.0.mlp.0.weight'],
                           t['model']['decoder.blocks.1.mlp.0.weight'])  # its layer 1, trained
    wers = log(tmp_path / 'base', 'val_wer')
    assert len(wers) == 4 and b['iter_num'] == 1 + wers.index(min(wers))  # the first best
    run(tiny(train_corpus, tmp_path / 'td', init_from=f'{tmp_path}/base/ckpt.pt', max_iters=2,
             always_save_checkpoint=True))
    d = torch.load(tmp_path / 'td' / 'ckpt.pt', weights_only=True)
    assert set(d['frozen']) == frozen and d['model_args']['dropout'] == 0.0
    assert all(torch.equal(d['model'][k], b['model'][k]) for k in frozen)

def test_token_noise_swaps_only_transcript_inputs():
    from data import token_noise
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 60, (n,), generator=g).tolist() for n in (30, 25, 12, 40)]
    prompt = [1, 2, 3]
    L = len(prompt) + max(map(len, seqs))
    tokens, targets = torch.zeros(4, L, dtype=torch.long), torch.full((4, L), -100)
    for b, s in enumerate(seqs):  # data.Batches' layout: targets are the inputs shifted by one
        row = prompt + s + [0]
        tokens[b, :len(row) - 1] = torch.tensor(row[:-1])
        targets[b, len(prompt) - 1:len(row) - 1] = torch.tensor(row[len(prompt):])
    noisy = token_noise(tokens, targets, 0.3, torch.Generator().manual_seed(1))
    text_in = torch.zeros_like(tokens, dtype=torch.bool)
    for b, s in enumerate(seqs):
        text_in[b, len(prompt):len(prompt) + len(s)] = True
    changed = noisy != tokens
    assert not changed[~text_in].any()  # prompt and padding untouched
    assert 0.15 < changed[text_in].float().mean() < 0.35  # ~0.3, less the draws of the same id
    assert set(noisy[changed].tolist()) <= set(tokens[text_in].tolist())  # the batch's own tokens
    assert torch.equal(token_noise(tokens, targets, 0.0), tokens)

def test_distil_whisper_loss_by_hand():
    """3 positions of a 3-token vocabulary: 0.8 x cross-entropy + tau^2 x KL(p_T || p_S) at
    tau = 2, a mean over positions, written out with math."""
    import math
    from common import distil_whisper_loss
    s = [[1.0, 0.0, -1.0], [0.0, 2.0, 0.0], [0.5, 0.5, 3.0]]
    t = [[2.0, 0.0, 0.0], [0.0, 1.0, 1.0], [-1.0, 0.0, 2.0]]
    y = [0, 1, 2]
    soft = lambda z, tau: [math.exp(v / tau) / sum(math.exp(u / tau) for u in z) for v in z]
    ce = sum(-math.log(soft(s[i], 1)[y[i]]) for i in range(3)) / 3
    kl = sum(sum(p * math.log(p / q) for p, q in zip(soft(t[i], 2), soft(s[i], 2)))
             for i in range(3)) / 3
    loss, ce_t, kl_t = distil_whisper_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y))
    assert math.isclose(ce_t.item(), ce, rel_tol=1e-6) and math.isclose(kl_t.item(), 4 * kl,
                                                                         rel_tol=1e-5)
    assert math.isclose(loss.item(), 0.8 * ce + 4 * kl, rel_tol=1e-5)
    half = distil_whisper_loss(torch.tensor(s), torch.tensor(t), torch.tensor(y), kl_weight=0.5)
    assert math.isclose(half[0].item(), 0.8 * ce + 2 * kl, rel_tol=1e-5)

def test_distil_whisper_objective_run(train_corpus, tmp_path):
    """train.py --teacher_path (the demo's dw row): a student of the teacher learns from the
    teacher's KL as well as the labels; log.jsonl has both terms, and the KL falls. A teacher of
    another tokenizer is refused in one line."""
    run(tiny(train_corpus, tmp_path / 'teacher', n_text_layer=2, max_iters=60, learning_rate=1e-2))
    kw = dict(init_from=f'{tmp_path}/teacher/ckpt.pt', student_layers=1, max_iters=30,
              teacher_path=f'{tmp_path}/teacher/ckpt.pt', log_interval=5, kl_weight=5.0)
    run(tiny(train_corpus, tmp_path / 'dw', **kw))
    kl, ce, loss = (log(tmp_path / 'dw', k) for k in ('kl', 'ce', 'loss'))
    assert len(kl) == 6 and kl[-1] < 0.5 * kl[0], kl
    assert all(abs(l - (0.8 * c + 5 * k)) < 1e-3 * l for l, c, k in zip(loss, ce, kl))
    run(tiny(train_corpus, tmp_path / 'other', max_iters=1, vocab_size=40))
    p = run(tiny(train_corpus, tmp_path / 'bad', **dict(kw, teacher_path=f'{tmp_path}/other/ckpt.pt')),
            check=False)
    assert p.returncode == 1 and "distil-whisper's objective takes" in p.stderr
