"""distill.py: every loss equals a brute-force computation, vanishes when student == teacher, OPD lowers the KL to the
teacher, 2-process DDP gives the 1-process update, resume is exact. Tiny random models, random mels, CPU, seeded."""
import copy
import math
import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import distill
from distill import masked_log_softmax, opd_loss, opd_step, pack, rollout, Rescore, diagnostics, union_support
from model import ModelDimensions, Whisper

V, EOT, SOT = 60, 0, 1
TOK = SimpleNamespace(eot=EOT, sot=SOT, suppress=[SOT, 2], suppress_blank=[EOT], sot_sequence=lambda language=None: [SOT])
LOSSES = ['topk_union', 'fkl', 'rkl', 'jsd', 'pg']

@pytest.fixture(autouse=True)
def one_thread():  # 2 shared cores: a second OpenMP thread only spins
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def tiny(seed, std=None, n_vocab=V, n_audio_ctx=100):
    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(n_mels=80, n_audio_ctx=n_audio_ctx, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                                    n_vocab=n_vocab, n_text_ctx=40, n_text_state=64, n_text_head=4, n_text_layer=2))
    if std:  # peaked outputs, so decoding is not trivial
        for p in model.parameters():
            p.data.normal_(0, std)
    return model

def cfg(**kw):
    c = {k: getattr(distill, k) for k in distill.config_keys}
    c.update(topk=8, max_new_tokens=12, tokens_per_second=4.0, length_slack=4, teacher_bf16=False,
             student_bf16=False)  # exact math here
    c.update(kw)
    return SimpleNamespace(**c)

def batch_of(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'mel': torch.randn(B, 80, 120, generator=g), 'duration': torch.tensor([1.0, 2.0, 1.5, 0.5][:B] * (B // 4 or 1)),
            'audio': [f'a{b}.wav' for b in range(B)]}

def scored(student, teacher, B=4):
    """Rollout of the student, then both models' masked log-probs at the scored positions."""
    batch = batch_of(B)
    with torch.no_grad():
        xa_s, xa_t = student.encoder(batch['mel']), teacher.encoder(batch['mel'])
    seqs, ended = rollout(student, xa_s, [[SOT]] * B, TOK, 12, [8, 3, 12, 5][:B])
    tokens, targets = pack([[SOT]] * B, seqs, ended, EOT)
    valid = targets != -100
    with torch.no_grad():
        lp_t = masked_log_softmax(teacher.decoder(tokens, xa_t)[valid], TOK.suppress)
    lp_s = masked_log_softmax(student.decoder(tokens, xa_s)[valid], TOK.suppress)
    return lp_s, lp_t, targets[valid], seqs, ended

def brute(lp_s, lp_t, x, loss, k, tau, beta):
    """The losses with python loops over positions and vocabulary."""
    out = []
    for i in range(len(x)):
        s, t = lp_s[i].tolist(), lp_t[i].tolist()
        ids = [j for j in range(V) if math.isfinite(t[j])]
        if loss == 'pg':
            out.append((s[x[i]] - t[x[i]]) * s[x[i]])
            continue
        if loss == 'topk_union':
            top = lambda v: sorted(range(V), key=lambda j: -v[j])[:k]
            ids = [j for j in set(top(s)) | set(top(t)) if math.isfinite(s[j]) and math.isfinite(t[j])]
            if len(ids) < 2:
                out.append(0.0)
                continue
        def dist(v):
            z = sum(math.exp(v[j] / tau) for j in ids)
            return {j: math.exp(v[j] / tau) / z for j in ids}
        ps, pt = dist(s), dist(t)
        kl = lambda p, q: sum(p[j] * math.log(p[j] / q[j]) for j in ids if p[j] > 0)
        if loss in ('topk_union', 'fkl'):
            d = kl(pt, ps)
        elif loss == 'rkl':
            d = kl(ps, pt)
        else:
            m = {j: beta * pt[j] + (1 - beta) * ps[j] for j in ids}
            d = beta * kl(pt, m) + (1 - beta) * kl(ps, m)
        out.append(tau ** 2 * d)
    return out

@pytest.mark.parametrize('loss', LOSSES)
def test_loss_equals_brute_force(loss):
    lp_s, lp_t, x, seqs, ended = scored(tiny(1, 0.3), tiny(2, 0.3))
    assert len(x) > 10 and lp_t[:, TOK.suppress].isinf().all()
    for k, tau, beta in ((8, 1.0, 0.5), (3, 2.0, 0.2)):
        per_pos, ok = opd_loss(lp_s, lp_t, x, loss, k, tau, beta)
        assert per_pos.tolist() == pytest.approx(brute(lp_s.detach(), lp_t, x.tolist(), loss, k, tau, beta), rel=1e-4, abs=1e-6)
    if loss == 'pg':  # d loss / d log p_S(x) = log p_S(x) - log p_T(x), the (negative) reward
        leaf = lp_s.detach().requires_grad_()
        opd_loss(leaf, lp_t, x, 'pg')[0].sum().backward()
        rows = torch.arange(len(x))
        torch.testing.assert_close(leaf.grad[rows, x], (leaf - lp_t)[rows, x].detach())

def test_topk_union_with_full_k_is_forward_kl_and_vuss():
    lp_s, lp_t, x, _, _ = scored(tiny(1, 0.3), tiny(2, 0.3))
    torch.testing.assert_close(opd_loss(lp_s, lp_t, x, 'topk_union', k=V)[0], opd_loss(lp_s, lp_t, x, 'fkl')[0])
    d = diagnostics(*union_support(lp_s.topk(8).indices, lp_t, 8)[1:], lp_t, lp_s)
    assert 8 <= d['vuss'] / d['positions'] <= 16 and 0 <= d['overlap'] / d['positions'] <= 1 and d['kl_st'] > 0
    d = diagnostics(*union_support(lp_t.topk(8).indices, lp_t, 8)[1:], lp_t, lp_t)
    assert d['vuss'] == 8 * d['positions'] and d['overlap'] == d['positions'] and d['kl_st'] == 0

def test_union_only_step_equals_full_vocabulary_loss():
    """opd_step's topk_union projects the student onto U_t only (top-k recorded in the rollout): the same loss and the
    same gradients as opd_loss on the student's full log-probabilities."""
    teacher, student = tiny(3, 0.3), tiny(4, 0.3).train()
    batch = batch_of()
    with torch.no_grad():
        xa = teacher.encoder(batch['mel'])
    total, n, stats = opd_step(student, Rescore(student), teacher, TOK, batch, [[SOT]] * 4, xa, xa, cfg())
    total.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    seqs, ended = rollout(student, xa, [[SOT]] * 4, TOK, 12, distill.length_bounds([1.0, 2.0, 1.5, 0.5], 4.0, 4))
    tokens, targets = pack([[SOT]] * 4, seqs, ended, EOT)
    valid = targets != -100
    with torch.no_grad():
        lp_t = masked_log_softmax(teacher.decoder(tokens, xa)[valid], TOK.suppress)
    per_pos, ok = opd_loss(masked_log_softmax(student.decoder(tokens, xa)[valid], TOK.suppress), lp_t, targets[valid], k=8)
    per_pos.sum().backward()
    assert n == ok.sum() == stats['positions'] > 10 and total.item() > 0.01
    torch.testing.assert_close(total, per_pos.sum(), rtol=1e-5, atol=1e-6)
    assert grads.keys() == {k for k, p in student.named_parameters() if p.grad is not None}
    for k, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6)

def first_repeat(tokens, n):  # brute force: the prefix that ends where some n-gram occurs for the second time
    for i in range(n, len(tokens) + 1):
        if tuple(tokens[i - n:i]) in {tuple(tokens[j - n:j]) for j in range(n, i)}:
            return tokens[:i]
    return tokens

@pytest.mark.parametrize('loss', ['topk_union', 'fkl'])
def test_loop_unlikelihood_replaces_the_kl_on_repeated_ngrams(loss):
    """A rollout cut at a repeated n-gram: its last n tokens get w * -log(1 - p_S(token)) instead of the KL (p_S
    renormalised on U_t for topk_union, which never sees the full vocabulary), every other position keeps its KL."""
    teacher, student = tiny(3, 0.3), tiny(4, 0.3).train()
    batch = batch_of()
    with torch.no_grad():
        xa = teacher.encoder(batch['mel'])
    c = cfg(loss=loss, ngram_stop=2, loop_unlikelihood=0.5, max_new_tokens=30, length_slack=30)
    total, n, stats = opd_step(student, Rescore(student), teacher, TOK, batch, [[SOT]] * 4, xa, xa, c)
    seqs, ended = rollout(student, xa, [[SOT]] * 4, TOK, 30, distill.length_bounds([1.0, 2.0, 1.5, 0.5], 4.0, 30),
                          ngram_stop=2)
    tokens, targets = pack([[SOT]] * 4, seqs, ended, EOT)
    valid = targets != -100
    with torch.no_grad():
        lp_t = masked_log_softmax(teacher.decoder(tokens, xa)[valid], TOK.suppress)
        lp_s = masked_log_softmax(student.decoder(tokens, xa)[valid], TOK.suppress)
    x = targets[valid]
    kl, ok = opd_loss(lp_s, lp_t, x, loss, k=8)
    union, valid_u, _ = union_support(lp_s.topk(8).indices, lp_t, 8)
    expect, looped, i = [], 0, 0
    for s, e in zip(seqs, ended):
        tail = not e and tuple(s[-2:]) in [tuple(s[j:j + 2]) for j in range(len(s) - 2)]
        looped += tail
        for j in range(len(s) + e):
            p = lp_s[i, x[i]].exp()
            if loss == 'topk_union':
                p = p / lp_s[i, union[i][valid_u[i]]].exp().sum()
            expect.append(0.5 * -torch.log(1 - p) if tail and j >= len(s) - 2 else kl[i])
            i += 1
    assert looped >= 1 and stats['looped'] == looped and n == len(expect) == ok.sum()
    torch.testing.assert_close(total, torch.stack(expect).sum(), rtol=1e-4, atol=1e-5)
    total.backward()  # finite gradients through the log1p
    assert all(p.grad.isfinite().all() for p in student.parameters() if p.grad is not None)

def test_rollout_bounds_and_teacher_rollouts():
    assert distill.length_bounds([0.0, 2.0], 6.0, 8) == [8, 20]
    teacher, student = tiny(1, 0.3), tiny(2, 0.3)
    batch = batch_of()
    with torch.no_grad():
        xa = teacher.encoder(batch['mel'])
    seqs, ended = rollout(teacher, xa, [[SOT]] * 4, TOK, 12, [3, 4, 5, 6])
    assert [len(s) for s in seqs] == [3, 4, 5, 6] and not any(ended)  # a peaked random model never ends: cut by the bound
    full, _ = rollout(student, xa, [[SOT]] * 4, TOK, 30)
    for n in (1, 2, 3):  # the loop stop inside generate == cutting the unstopped rollout at its first repeated n-gram
        cut, ended = rollout(student, xa, [[SOT]] * 4, TOK, 30, ngram_stop=n)
        assert cut == [first_repeat(s, n) for s in full] and not any(ended)
    assert any(len(c) < len(s) for c, s in zip(cut, full))
    c = cfg(length_slack=0, tokens_per_second=4.0)  # bounds 4, 8, 6, 2 for durations 1, 2, 1.5, 0.5 s
    _, n, stats = opd_step(student, Rescore(student), teacher, TOK, batch, [[SOT]] * 4, xa, xa, c, teacher_rollout=True)
    assert n == stats['rollout_len'] == 4 + 8 + 6 + 2 and stats['ended'] == 0  # no EOT target after a cut

def test_encoder_cache_memory_and_disk(tmp_path):
    model = tiny(8)
    mel = torch.randn(3, 80, 120)
    paths = [str(tmp_path / f"{name}.wav") for name in 'abc']  # the cache keys on the file's path, size and mtime
    for p in paths:
        open(p, 'w').write('x')
    cache = distill.EncoderCache(model.encoder, directory=str(tmp_path / 'cache'))
    xa = cache(mel, paths)
    torch.testing.assert_close(xa, model.encoder(mel).detach().half().float())
    again = distill.EncoderCache(model.encoder, directory=str(tmp_path / 'cache'))  # a later run: read from disk
    assert torch.equal(again(torch.zeros(2, 80, 120), [paths[2], paths[0]]), xa[[2, 0]])
    open(paths[0], 'w').write('a regenerated file')  # a new corpus at the same path: encoded again, not read stale
    fresh = distill.EncoderCache(model.encoder, directory=str(tmp_path / 'cache'))
    assert torch.equal(fresh(torch.zeros(1, 80, 120), [paths[0]]), model.encoder(torch.zeros(1, 80, 120)).detach().half().float())

def test_pack_targets_rollout_plus_eot_only_when_ended():
    tokens, targets = pack([[1], [1, 5]], [[7, 8], [9]], [True, False], EOT)
    assert tokens.tolist() == [[1, 7, 8], [1, 5, EOT]]  # EOT pads
    assert targets.tolist() == [[7, 8, EOT], [-100, 9, -100]]

@pytest.mark.parametrize('loss', LOSSES)
def test_zero_when_student_is_teacher(loss):
    teacher = tiny(3, 0.3)
    student = copy.deepcopy(teacher).train()
    before = copy.deepcopy(student.state_dict())
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2, weight_decay=0.0)
    batch = batch_of()
    with torch.no_grad():
        xa = teacher.encoder(batch['mel'])
    total, n, stats = opd_step(student, Rescore(student), teacher, TOK, batch, [[SOT]] * 4, xa, None, cfg(loss=loss))
    assert n > 10 and abs(total.item()) < 1e-6 and stats['kl_st'] < 1e-6 and stats['vuss'] == 8 * stats['positions']
    (total / n).backward()
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-7
    for p in student.parameters():  # tiny rounding in the gradients must not become an Adam step of size lr
        p.grad = torch.where(p.grad.abs() < 1e-7, 0.0, p.grad)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())

def test_teacher_bf16_scoring_is_close_to_float32():
    teacher = tiny(3, 0.3)
    student = tiny(4, 0.3).train()
    batch = batch_of()
    with torch.no_grad():
        xa = teacher.encoder(batch['mel'])
    loss = {}
    for bf16 in (False, True):
        total, n, _ = opd_step(student, Rescore(student), teacher, TOK, batch, [[SOT]] * 4, xa, None,
                               cfg(loss='topk_union', teacher_bf16=bf16))
        loss[bf16] = total.item() / n.item()
    assert loss[False] > 0.01 and loss[True] != loss[False] and abs(loss[True] - loss[False]) < 0.05 * loss[False]

@pytest.mark.parametrize('loss', ['topk_union', 'rkl'])
def test_student_bf16_update_is_close_to_float32(loss):
    teacher = tiny(3, 0.3)
    student = tiny(4, 0.3).train()
    batch = batch_of()
    with torch.no_grad():
        xa = teacher.encoder(batch['mel'])
    out = {}
    for bf16 in (False, True):
        total, n, stats = opd_step(student, Rescore(student), teacher, TOK, batch, [[SOT]] * 4, xa, xa,
                                   cfg(loss=loss, temperature=0.0, student_bf16=bf16))
        (total / n).backward()
        grad = torch.cat([p.grad.flatten() for p in student.decoder.parameters()])
        student.zero_grad()
        out[bf16] = total.item() / n.item(), grad, stats['rollout_len']
    (l32, g32, len32), (l16, g16, len16) = out[False], out[True]
    assert l32 > 0.01 and l16 != l32 and abs(l16 - l32) < 0.05 * l32 and len16 == len32
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99

def test_opd_lowers_kl_to_teacher():
    teacher, student = tiny(4, 0.5), tiny(5)
    student.encoder.load_state_dict(teacher.encoder.state_dict())  # the demo's setting: shared frozen encoder
    student.encoder.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95))
    batch = batch_of(8)
    with torch.no_grad():
        xa = teacher.encoder(batch['mel'])
    c, rescore, kls = cfg(), Rescore(student), []
    for step in range(60):
        total, n, stats = opd_step(student, rescore, teacher, TOK, batch, [[SOT]] * 8, xa, xa, c)
        (total / n.clamp(min=1)).backward()
        opt.step()
        opt.zero_grad()
        kls.append(stats['kl_ts'] / stats['positions'])
    print('KL(T||S) first/last', kls[0], kls[-1])
    assert kls[-1] < 0.2 * kls[0]  # 2.1 -> 0.13 nats/token

# -----------------------------------------------------------------------------
# the whole loop on a tiny corpus: DDP equivalence and exact resume

@pytest.fixture(scope='module')
def setup(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    from data import read_manifest, write_manifest
    d = tmp_path_factory.mktemp('distill')
    rows = read_manifest(os.path.join(tiny_corpus, 'train.jsonl'))[:4]
    write_manifest(str(d / 'train4.jsonl'), rows)
    n_vocab = tiny_tokenizer.n_vocab
    for name, seed, std in (('teacher', 6, 0.3), ('student', 7, None)):
        m = tiny(seed, std, n_vocab, n_audio_ctx=400)
        if name == 'teacher':  # a bias towards EOT, so that its greedy transcripts end (mode='td' keeps only those)
            m.decoder.ln.bias.data += 0.5 * m.decoder.token_embedding.weight[tiny_tokenizer.eot]
        torch.save({'model': m.state_dict(), 'model_args': vars(m.dims), 'tokenizer': tiny_tokenizer.to_dict()},
                   str(d / f'{name}.pt'))
    return dict(teacher_path=str(d / 'teacher.pt'), init_from=str(d / 'student.pt'), train_manifest=str(d / 'train4.jsonl'),
                val_manifest=os.path.join(tiny_corpus, 'val.jsonl'), freeze_encoder=False, eval_interval=0,
                log_interval=1, batch_size=4, learning_rate=1e-3, warmup_iters=0, topk=8, tokens_per_second=4.0,
                max_new_tokens=16, seed=3, n_frames=400), d

def _weights(path):
    return torch.load(path, map_location='cpu', weights_only=False)['model']

def _ddp_worker(rank, port, overrides):
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE='2', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distill.distill(overrides)
    torch.distributed.destroy_process_group()

def test_cli_bad_audio_is_one_line(setup):
    import subprocess
    import sys
    from data import read_manifest, write_manifest
    base, d = setup
    rows = read_manifest(base['train_manifest'])
    rows[1]['audio'] = str(d / 'missing.wav')
    write_manifest(str(d / 'bad.jsonl'), rows)
    args = [f'--{k}={v}' for k, v in dict(base, train_manifest=str(d / 'bad.jsonl'), out_dir=str(d / 'bad'), max_iters=2,
                                         val_manifest='').items()]
    p = subprocess.run([sys.executable, 'distill.py'] + args, cwd=os.path.dirname(os.path.abspath(distill.__file__)),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"distill.py: error: {d / 'missing.wav'}: file not found"
    assert not os.path.exists(d / 'bad' / 'ckpt.pt')

def test_ddp_two_processes_equal_one(setup):
    base, d = setup
    base = dict(base, student_bf16=False)  # float32: bf16 rounding of a matmul depends on how the batch is split
    one = distill.distill(dict(base, out_dir=str(d / 'one'), max_iters=1))
    assert one['iter'] == 1 and math.isfinite(one['loss'])
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(_ddp_worker, args=(port, dict(base, out_dir=str(d / 'two'), max_iters=1, batch_size=2)),
                                nprocs=2)
    w1, w2 = _weights(str(d / 'one' / 'ckpt.pt')), _weights(str(d / 'two' / 'ckpt.pt'))
    w0 = _weights(base['init_from'])
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # it did train
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-5)

def test_resume_is_exact_and_checkpoint_loads(setup):
    base, d = setup
    distill.distill(dict(base, out_dir=str(d / 'straight'), max_iters=4, temperature=1.0, n_samples=2, lr_decay_iters=4))
    distill.distill(dict(base, out_dir=str(d / 'resumed'), max_iters=2, temperature=1.0, n_samples=2, lr_decay_iters=4))
    s = distill.distill(dict(base, out_dir=str(d / 'resumed'), max_iters=4, init_from='resume', temperature=1.0, n_samples=2,
                                lr_decay_iters=4))
    assert s['iter'] == 4
    a, b = _weights(str(d / 'straight' / 'ckpt.pt')), _weights(str(d / 'resumed' / 'ckpt.pt'))
    assert all(torch.equal(a[k], b[k]) for k in a)
    import evaluate
    model, tok = evaluate.load_checkpoint(str(d / 'resumed' / 'ckpt.pt'))
    assert tok.n_vocab == model.dims.n_vocab

@pytest.mark.parametrize('mode', ['td', 'sft'])
def test_baselines_run(setup, mode):
    base, d = setup
    s = distill.distill(dict(base, out_dir=str(d / mode), max_iters=2, mode=mode, eval_interval=2))
    assert s['iter'] == 2 and math.isfinite(s['loss']) and s['val_wer'] is not None
    if mode == 'td':
        assert os.path.exists(str(d / mode / 'teacher_labels.jsonl'))

def test_best_val_checkpoint_and_dropout(setup):
    import json
    base, d = setup
    out = d / 'best'
    distill.distill(dict(base, out_dir=str(out), max_iters=4, mode='sft', eval_interval=1, learning_rate=3e-3, dropout=0.2))
    log = [r for r in map(json.loads, open(out / 'log.jsonl')) if 'val_wer' in r]
    best = min(log, key=lambda r: r['val_wer'])  # the first of equal bests: a tie does not replace the checkpoint
    ckpt = torch.load(str(out / 'ckpt.pt'), map_location='cpu', weights_only=False)
    assert ckpt['iter_num'] == best['iter'] and ckpt['best_val_wer'] == best['val_wer'] and ckpt['model_args']['dropout'] == 0.2
    s = distill.distill(dict(base, out_dir=str(d / 'no_dropout'), init_from=str(out / 'ckpt.pt'), max_iters=1))
    assert torch.load(s['ckpt'], map_location='cpu', weights_only=False)['model_args']['dropout'] == 0.0

def test_nan_guard_stops(setup):
    base, d = setup
    with pytest.raises(SystemExit):
        distill.distill(dict(base, out_dir=str(d / 'nan'), max_iters=2, tau=float('nan')))
    assert not os.path.exists(str(d / 'nan' / 'ckpt.pt'))

@pytest.mark.slow
def test_compiled_path_runs(setup):
    base, d = setup
    s = distill.distill(dict(base, out_dir=str(d / 'compiled'), max_iters=2, compile=True))
    assert s['iter'] == 2 and math.isfinite(s['loss'])

def test_distilled_student_exports_to_openai_whisper(setup):
    whisper = pytest.importorskip('whisper')
    import evaluate
    import teacher
    base, d = setup
    s = distill.distill(dict(base, out_dir=str(d / 'export'), max_iters=1))
    model, tok = evaluate.load_checkpoint(s['ckpt'])
    teacher.save_pt(model, str(d / 'student.whisper.pt'), tok)
    theirs = whisper.load_model(str(d / 'student.whisper.pt'), device='cpu')
    mel, tokens = torch.randn(1, 80, 800), torch.tensor([tok.sot_sequence() + [5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(mel, tokens), model(mel, tokens), atol=1e-4, rtol=1e-4)

def test_token_noise_swaps_only_transcript_inputs():
    seen = []
    def rescore(tokens, xa=None, mel=None):  # records what the decoder reads; logits that depend on nothing
        seen.append(tokens.clone())
        return torch.zeros(*tokens.shape, V)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, V, (n,), generator=g).tolist() for n in (30, 25, 12, 40)]
    prompt = [SOT, 2, 3]
    tokens, targets = pack([prompt] * 4, seqs, [True] * 4, EOT)
    batch = {'tokens': tokens, 'targets': targets}
    clean = distill.ce_step(rescore, batch, torch.zeros(4, 1, 64), 'cpu')
    noisy = distill.ce_step(rescore, batch, torch.zeros(4, 1, 64), 'cpu', 0.3, torch.Generator().manual_seed(1))
    assert torch.equal(seen[0], tokens) and clean[1] == noisy[1] and torch.equal(clean[0], noisy[0])  # same targets
    text_in = torch.zeros_like(tokens, dtype=torch.bool)
    for b, s in enumerate(seqs):
        text_in[b, len(prompt):len(prompt) + len(s)] = True
    changed = seen[1] != tokens
    assert not changed[~text_in].any()  # prompt and padding untouched
    assert 0.15 < changed[text_in].float().mean() < 0.35  # ~0.3, less the swaps that drew the same id
    assert set(seen[1][changed].tolist()) <= set(tokens[text_in].tolist())  # drawn from the batch's transcripts
