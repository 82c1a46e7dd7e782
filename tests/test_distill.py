"""distill.py: every loss equals a brute-force computation and vanishes when student == teacher; the
union-only re-scoring equals the full-vocabulary formula; OPD lowers the KL to the teacher; the
script itself: 2-process DDP gives the 1-process update, resume is exact, bad input is one line."""
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import distill
from checkpoint import load_checkpoint
from distill import (Rescore, Side, Step, divergence, length_bounds, masked_log_softmax, opd_step, pack,
                     rollout, topk_union_kl, union_support)
from model import ModelDimensions, Whisper

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
V, EOT, SOT = 60, 0, 1
TOK = SimpleNamespace(eot=EOT, sot=SOT, suppress=[SOT, 2], suppress_blank=[EOT],
                      sot_sequence=lambda language=None: [SOT])
LOSSES = ['topk_union', 'fkl', 'rkl', 'jsd', 'pg']

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

HP = Step(topk=8, max_new_tokens=12, cpu_bf16=False)  # one step's settings: exact float32 math

def hp(**kw):
    return dataclasses.replace(HP, **kw)

def bounds(durations, length_slack=4):
    return length_bounds(durations, tokens_per_second=4.0, length_slack=length_slack)

def step(student, teacher, xa, durations, hp=HP, full_diag=False, rescore=None, length_slack=4):
    """distill.opd_step on a batch both models read alike (one tokenizer, one prompt, one xa)."""
    prompts = [[SOT]] * len(durations)
    return opd_step(Side(student, TOK, xa, None, prompts), Side(teacher, TOK, xa, None, prompts),
                    rescore or Rescore(student), bounds(durations, length_slack), hp,
                    full_diag=full_diag)

def opd_loss(lp_s, lp_t, x, loss='topk_union', k=8, tau=1.0, beta=0.5):
    """The loss per position on full log-probabilities: the paper's (topk_union_kl on U_t, the
    student's top-k from its own log-probs), or the other divergences."""
    if loss == 'topk_union':
        union, valid, _ = union_support(lp_s.detach().topk(min(k, lp_s.shape[-1]), -1).indices, lp_t, k)
        return topk_union_kl(lp_s.gather(1, union), lp_t.gather(1, union), valid, tau)
    return divergence(lp_s, lp_t, x, loss, tau, beta), torch.ones(len(x), dtype=torch.bool)

def tiny(seed, std=None, n_vocab=V, n_audio_ctx=100):
    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(n_mels=80, n_audio_ctx=n_audio_ctx, n_audio_state=64, n_audio_head=4,
                                    n_audio_layer=2, n_vocab=n_vocab, n_text_ctx=40, n_text_state=64,
                                    n_text_head=4, n_text_layer=2))
    if std:  # peaked outputs, so decoding is not trivial
        for p in model.parameters():
            p.data.normal_(0, std)
    return model

def batch_of(B=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {'mel': torch.randn(B, 80, 120, generator=g),
            'duration': [1.0, 2.0, 1.5, 0.5][:B] * (B // 4 or 1)}

def encoded(model, B=4):
    batch = batch_of(B)
    with torch.no_grad():
        return batch, model.encoder(batch['mel'])

def scored(student, teacher, B=4):
    """Rollout of the student, then both models' masked log-probs at the scored positions."""
    batch = batch_of(B)
    with torch.no_grad():
        xa_s, xa_t = student.encoder(batch['mel']), teacher.encoder(batch['mel'])
    seqs, ended, _ = rollout(student, TOK, xa_s, [[SOT]] * B, [8, 3, 12, 5][:B], HP)
    tokens, targets = pack([[SOT]] * B, seqs, ended, EOT)
    mask = targets != -100
    with torch.no_grad():
        lp_t = masked_log_softmax(teacher.decoder(tokens, xa_t)[mask], TOK.suppress)
    lp_s = masked_log_softmax(student.decoder(tokens, xa_s)[mask], TOK.suppress)
    return lp_s, lp_t, targets[mask], seqs, ended

def full_vocabulary(student, teacher, xa, durations, hp=HP, length_slack=4):
    """The readable formula: both models' full log-probabilities on the student's rollout, opd_loss."""
    seqs, ended, _ = rollout(student, TOK, xa, [[SOT]] * len(durations), bounds(durations, length_slack), hp)
    tokens, targets = pack([[SOT]] * len(durations), seqs, ended, EOT)
    mask = targets != -100
    with torch.no_grad():
        lp_t = masked_log_softmax(teacher.decoder(tokens, xa)[mask], TOK.suppress)
    lp_s = masked_log_softmax(student.decoder(tokens, xa)[mask], TOK.suppress)
    return lp_s, lp_t, targets[mask], seqs, ended

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
        expect = brute(lp_s.detach(), lp_t, x.tolist(), loss, k, tau, beta)
        assert per_pos.tolist() == pytest.approx(expect, rel=1e-4, abs=1e-6)
    if loss == 'pg':  # d loss / d log p_S(x) = log p_S(x) - log p_T(x), the (negative) reward
        leaf = lp_s.detach().requires_grad_()
        opd_loss(leaf, lp_t, x, 'pg')[0].sum().backward()
        rows = torch.arange(len(x))
        torch.testing.assert_close(leaf.grad[rows, x], (leaf - lp_t)[rows, x].detach())

def test_topk_union_with_full_k_is_forward_kl():
    lp_s, lp_t, x, _, _ = scored(tiny(1, 0.3), tiny(2, 0.3))
    torch.testing.assert_close(opd_loss(lp_s, lp_t, x, 'topk_union', k=V)[0], opd_loss(lp_s, lp_t, x, 'fkl')[0])
    union, valid, dup = union_support(lp_s.topk(8).indices, lp_t, 8)
    assert (valid.sum(1) >= 8).all() and (valid.sum(1) <= 16).all()
    assert torch.equal(valid[:, 8:], ~dup & lp_t.gather(1, union[:, 8:]).isfinite())

def test_union_only_step_equals_full_vocabulary_loss():
    """opd_step's topk_union scores the student on U_t only (its top-k recorded in the rollout):
    the same loss and the same gradients as opd_loss on the full log-probabilities."""
    teacher, student = tiny(3, 0.3), tiny(4, 0.3).train()
    batch, xa = encoded(teacher)
    total, n, stats = step(student, teacher, xa, batch['duration'], full_diag=True)
    total.backward()
    grads = {k: p.grad.clone() for k, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    lp_s, lp_t, x, _, _ = full_vocabulary(student, teacher, xa, batch['duration'])
    per_pos, ok = opd_loss(lp_s, lp_t, x, k=8)
    per_pos.sum().backward()
    assert n == ok.sum() == stats['positions'] > 10 and total.item() > 0.01
    assert stats['kl_ts'] > 0 and 8 * n <= stats['vuss'] <= 16 * n
    torch.testing.assert_close(total, per_pos.sum(), rtol=1e-5, atol=1e-6)
    assert grads.keys() == {k for k, p in student.named_parameters() if p.grad is not None}
    for k, p in student.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(grads[k], p.grad, rtol=1e-4, atol=1e-6)

def first_repeat(tokens, n):  # brute force: the prefix that ends where some n-gram occurs again
    for i in range(n, len(tokens) + 1):
        if tuple(tokens[i - n:i]) in {tuple(tokens[j - n:j]) for j in range(n, i)}:
            return tokens[:i]
    return tokens

@pytest.mark.parametrize('loss', ['topk_union', 'fkl'])
def test_loop_unlikelihood_replaces_the_kl_on_repeated_ngrams(loss):
    """A rollout cut at a repeated n-gram: its last n tokens get w * -log(1 - p_S(token)) instead of
    the KL (p_S renormalised on U_t for topk_union); every other position keeps its KL."""
    teacher, student = tiny(3, 0.3), tiny(4, 0.3).train()
    batch, xa = encoded(teacher)
    h = hp(loss=loss, ngram_stop=2, loop_unlikelihood=0.5, max_new_tokens=30)
    total, n, stats = step(student, teacher, xa, batch['duration'], h, length_slack=30)
    lp_s, lp_t, x, seqs, ended = full_vocabulary(student, teacher, xa, batch['duration'], h, 30)
    lp_s = lp_s.detach()
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

def test_rollout_bounds_and_loop_stop():
    assert length_bounds([0.0, 2.0], tokens_per_second=6.0, length_slack=8) == [8, 20]
    teacher, student = tiny(1, 0.3), tiny(2, 0.3)
    batch, xa = encoded(teacher)
    seqs, ended, top = rollout(teacher, TOK, xa, [[SOT]] * 4, [3, 4, 5, 6], HP, topk=8)
    assert [len(s) for s in seqs] == [3, 4, 5, 6] and not any(ended)  # never ends: cut by the bound
    assert [t.shape for t in top] == [(n, 8) for n in (3, 4, 5, 6)]
    full, _, _ = rollout(student, TOK, xa, [[SOT]] * 4, [30] * 4, hp(max_new_tokens=30))
    for n in (1, 2, 3):  # the loop stop inside generate == cutting the rollout at its first repeat
        cut, ended, _ = rollout(student, TOK, xa, [[SOT]] * 4, [30] * 4, hp(max_new_tokens=30, ngram_stop=n))
        assert cut == [first_repeat(s, n) for s in full] and not any(ended)
    assert any(len(c) < len(s) for c, s in zip(cut, full))

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
    batch, xa = encoded(teacher)
    total, n, stats = step(student, teacher, xa, batch['duration'], hp(loss=loss), full_diag=True)
    assert n > 10 and abs(total.item()) < 1e-6 and stats['kl_st'] < 1e-6
    assert stats['vuss'] == 8 * stats['positions']
    (total / n).backward()
    assert max(p.grad.abs().max().item() for p in student.parameters() if p.grad is not None) < 1e-7
    for p in student.parameters():  # tiny rounding in the gradients must not become an Adam step
        if p.grad is not None:
            p.grad = torch.where(p.grad.abs() < 1e-7, 0.0, p.grad)
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())

@pytest.mark.parametrize('loss', ['topk_union', 'rkl'])
def test_bf16_step_is_close_to_float32(loss):
    """cpu_bf16: rollout, teacher scoring and the student's re-scoring under bf16 autocast."""
    teacher, student = tiny(3, 0.3), tiny(4, 0.3).train()
    batch, xa = encoded(teacher)
    out = {}
    for bf16 in (False, True):
        total, n, stats = step(student, teacher, xa, batch['duration'], hp(loss=loss, cpu_bf16=bf16))
        (total / n).backward()
        grad = torch.cat([p.grad.flatten() for p in student.decoder.parameters()])
        student.zero_grad()
        out[bf16] = total.item() / n.item(), grad, stats['rollout_len']
    (l32, g32, len32), (l16, g16, len16) = out[False], out[True]
    assert l32 > 0.01 and l16 != l32 and abs(l16 - l32) < 0.05 * l32 and len16 == len32
    assert F.cosine_similarity(g16, g32, dim=0) > 0.99

def test_opd_lowers_kl_to_teacher():
    teacher, student = tiny(4, 0.5), tiny(5)
    student.encoder.load_state_dict(teacher.encoder.state_dict())  # the demo's shared frozen encoder
    student.encoder.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=1e-2, betas=(0.9, 0.95))
    batch, xa = encoded(teacher, 8)
    rescore, kls = Rescore(student), []
    for _ in range(60):
        total, n, stats = step(student, teacher, xa, batch['duration'], full_diag=True, rescore=rescore)
        (total / n.clamp(min=1)).backward()
        opt.step()
        opt.zero_grad()
        kls.append(stats['kl_ts'] / stats['positions'])
    assert kls[-1] < 0.2 * kls[0]  # 2.1 -> 0.13 nats/token

# -----------------------------------------------------------------------------
# the script on a tiny corpus: DDP equivalence, exact resume, bad input

@pytest.fixture(scope='module')
def setup(tiny_corpus, tiny_tokenizer, tmp_path_factory):
    from data import read_manifest, write_manifest
    d = tmp_path_factory.mktemp('distill')
    import numpy as np
    import soundfile as sf
    rows = read_manifest(os.path.join(tiny_corpus, 'train.jsonl'))[:4]
    audio, sr = zip(*[sf.read(r['audio']) for r in rows])
    n = max(len(x) for x in audio)  # equal lengths: the encoder's outputs do not depend on the batch
    for i, (r, x) in enumerate(zip(rows, audio)):
        r['audio'], r['duration'] = str(d / f'{i}.wav'), n / sr[i]
        sf.write(r['audio'], np.pad(x, (0, n - len(x))), sr[i])
    write_manifest(str(d / 'train4.jsonl'), rows)
    for name, seed, std, dropout in (('teacher', 6, 0.3, 0.0), ('student', 7, None, 0.2)):
        m = tiny(seed, std, tiny_tokenizer.n_vocab, n_audio_ctx=400)
        m.dims.dropout = dropout
        torch.save({'model': m.state_dict(), 'model_args': vars(m.dims), 'tokenizer': tiny_tokenizer.to_dict()},
                   str(d / f'{name}.pt'))
    return dict(teacher_path=str(d / 'teacher.pt'), init_from=str(d / 'student.pt'),
                train_manifest=str(d / 'train4.jsonl'), val_manifest=os.path.join(tiny_corpus, 'val.jsonl'),
                eval_interval=0, log_interval=1, batch_size=4, learning_rate=1e-3, warmup_iters=0, topk=8,
                tokens_per_second=4.0, max_new_tokens=16, seed=3, device='cpu'), d

def run(overrides, nproc=0, check=True):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    cmd = ([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}']
           if nproc else [sys.executable]) + ['distill.py'] + [f'--{k}={v}' for k, v in overrides.items()]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p

def weights(path):
    return torch.load(path, map_location='cpu', weights_only=True)['model']

def test_cli_bad_audio_is_one_line(setup):
    from data import read_manifest, write_manifest
    base, d = setup
    rows = read_manifest(base['train_manifest'])
    rows[1]['audio'] = str(d / 'missing.wav')
    write_manifest(str(d / 'bad.jsonl'), rows)
    p = run(dict(base, train_manifest=str(d / 'bad.jsonl'), out_dir=str(d / 'bad'), max_iters=2, val_manifest=''),
            check=False)
    assert p.returncode == 1 and 'Traceback' not in p.stderr, p.stderr
    assert p.stderr.strip().splitlines()[-1] == f"distill.py: error: {d / 'missing.wav'}: file not found"
    assert not os.path.exists(d / 'bad' / 'ckpt.pt')
    p = run(dict(base, out_dir=str(d / 'bad'), loss='xyz'), check=False)
    assert p.returncode == 1 and p.stderr.strip().splitlines()[-1].startswith("distill.py: error: loss='xyz'")

def test_ddp_two_processes_equal_one(setup):
    base, d = setup
    base = dict(base, cpu_bf16=False, max_iters=1)  # float32: bf16 rounding depends on the batch split
    run(dict(base, out_dir=str(d / 'one')))
    p = run(dict(base, out_dir=str(d / 'two'), batch_size=2), nproc=2)
    assert '2 process(es)' in p.stdout
    w1, w2, w0 = weights(d / 'one' / 'ckpt.pt'), weights(d / 'two' / 'ckpt.pt'), weights(base['init_from'])
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # it did train
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], atol=1e-6, rtol=1e-5)

def test_resume_is_exact_and_checkpoint_loads(setup):
    base, d = setup
    kw = dict(base, temperature=1.0, lr_decay_iters=4)  # sampled rollouts: the generator state resumes too
    run(dict(kw, out_dir=str(d / 'straight'), max_iters=4))
    run(dict(kw, out_dir=str(d / 'resumed'), max_iters=2))
    run(dict(kw, out_dir=str(d / 'resumed'), max_iters=4, init_from='resume'))
    a, b = weights(d / 'straight' / 'ckpt.pt'), weights(d / 'resumed' / 'ckpt.pt')
    assert all(torch.equal(a[k], b[k]) for k in a)
    model, tok, ckpt = load_checkpoint(str(d / 'resumed' / 'ckpt.pt'))
    assert ckpt['iter_num'] == 4 and tok.n_vocab == model.dims.n_vocab
    assert model.dims.dropout == 0.0  # the student's dropout 0.2 is off in OPD
    assert all(n.startswith('encoder.') for n in ckpt['frozen']) and ckpt['frozen']
    log = [json.loads(line) for line in open(d / 'resumed' / 'log.jsonl')]
    assert [r['iter'] for r in log if 'loss' in r] == [1, 2, 3, 4]
    assert all(math.isfinite(r['loss']) and 'vuss' in r for r in log if 'loss' in r)

def test_nan_guard_stops(setup):
    base, d = setup
    p = run(dict(base, out_dir=str(d / 'nan'), max_iters=3, learning_rate=1e30, grad_clip=0.0), check=False)
    assert p.returncode == 1 and 'non-finite loss' in p.stderr, p.stderr
    assert not os.path.exists(d / 'nan' / 'ckpt.pt')

@pytest.mark.slow
def test_compiled_path_runs(setup):
    base, d = setup
    run(dict(base, out_dir=str(d / 'compiled'), max_iters=2, compile=True))
    assert 'model' in torch.load(d / 'compiled' / 'ckpt.pt', weights_only=True)

def test_distilled_student_exports_to_openai_whisper(setup):
    whisper = pytest.importorskip('whisper')
    import checkpoint
    base, d = setup
    run(dict(base, out_dir=str(d / 'export'), max_iters=1))
    model, tok, _ = load_checkpoint(str(d / 'export' / 'ckpt.pt'))
    checkpoint.save_pt(model, str(d / 'student.whisper.pt'), tok)
    theirs = whisper.load_model(str(d / 'student.whisper.pt'), device='cpu')
    mel, tokens = torch.randn(1, 80, 800), torch.tensor([tok.sot_sequence() + [5, 6, 7]])
    with torch.no_grad():
        torch.testing.assert_close(theirs(mel, tokens), model(mel, tokens), atol=1e-4, rtol=1e-4)

def test_only_the_loop_reads_config_globals():
    """The pieces of a step take what they use as arguments: no function of distill.py but main
    (the script's loop) reads a config global."""
    import ast
    tree = ast.parse(open(os.path.join(ROOT, 'distill.py')).read())
    read = {}
    for top in tree.body:
        if not isinstance(top, (ast.FunctionDef, ast.ClassDef)) or top.name == 'main':
            continue
        local = {a.arg for n in ast.walk(top) if isinstance(n, ast.arguments)
                 for a in n.args + n.kwonlyargs + n.posonlyargs}
        local |= {n.id for n in ast.walk(top) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
        names = {n.id for n in ast.walk(top) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        read[top.name] = sorted((names - local) & set(distill.config_keys))
    assert 'opd_step' in read and 'rollout' in read
    assert {k: v for k, v in read.items() if v} == {}
