"""
On-policy distillation (OPD) of a small Whisper student from a frozen teacher, on unlabeled audio:

    python distill.py config/distill_demo_opd.py
    python distill.py config/distill_toy.py --loss=rkl --temperature=1.0
    torchrun --standalone --nproc_per_node=2 distill.py config/distill_demo_opd.py

One step, as the paper states it (opd_step, then the update in the loop):
1. rollout: the student transcribes the audio itself (greedy, KV-cached, no grad, control tokens
   masked), keeping its top-k ids at every step;
2. teacher scores: the frozen teacher, teacher-forced on [prompt + the student's tokens + EOT];
3. student re-scores: the same tokens, with gradients;
4. union top-k forward KL: at each position U_t = student top-k | teacher top-k, both renormalised
   on U_t, KL(p_T || p_S), averaged over every scored position of the (global) batch;
5. update: AdamW on the student's decoder (fp32 master weights).
The other objectives (fkl, rkl, jsd, pg) are small pure functions below (opd_loss).
A student with its own tokenizer and prompt (the audio-LLM: python distill.py
config/distill_ark_opd.py) goes through text instead (opd_step_text): its rollout is decoded,
re-tokenized and scored by the teacher under the teacher's prompt, and the top-k ids are mapped
between the vocabularies by token string.
"""
import dataclasses
import gc
import json
import math
import os
import sys
import time
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
import evaluate
from checkpoint import atomic_save, load_checkpoint, trim_log
from tokenizer import token_map
from model import AudioLLM, length_mask

# -----------------------------------------------------------------------------
# default config values
# I/O
out_dir = 'out/distill'
eval_interval = 100  # val WER every eval_interval steps (0 = only at the end)
log_interval = 10
always_save_checkpoint = False  # False: save when val WER improves (or at the end if never)
init_from = 'out/base/ckpt.pt'  # the student (train.py's base row), or 'resume'
# teacher and student (the student's encoder is frozen: OPD trains its decoder)
teacher_path = 'weights/base'  # Whisper weights (.pt / HF dir / CT2 dir) or our checkpoint; frozen
encoder_cache_dir = ''  # keep frozen encoders' outputs here (Whisper's fixed 30-s window only)
# data: OPD reads only the audio of train_manifest
train_manifest = 'data/synth_grammar/train.jsonl'
val_manifest = 'data/synth_grammar/val.jsonl'
val_max_utts = 100
batch_size = 16
eval_batch_size = 32
# the objective
loss = 'topk_union'  # 'topk_union' (paper), 'fkl', 'rkl' (GKD beta=1), 'jsd' (GKD), 'pg' (tinker)
topk = 32  # k of U_t = student top-k ids | teacher top-k ids
tau = 1.0  # temperature of the divergence; the loss is multiplied by tau^2
beta = 0.5  # jsd: 0 = forward KL, 1 = reverse KL
# rollouts
max_new_tokens = 64
temperature = 0.0  # 0 = greedy (paper)
tokens_per_second = 6.0  # a rollout stops after length_slack + tokens_per_second * duration tokens
length_slack = 8
# anti-loop measures (off unless a recipe turns them on)
ngram_stop = 0  # > 0: cut a rollout where an n-gram of this size repeats (no EOT target then)
loop_unlikelihood = 0.0  # > 0: that n-gram's tokens get w * -log(1 - p_S) instead of the KL
# AdamW and the schedule (the paper's launcher defaults)
learning_rate = 1e-4
max_iters = 500
weight_decay = 0.005
beta1 = 0.9
beta2 = 0.95
grad_clip = 1.0
decay_lr = True
warmup_iters = 50
lr_decay_iters = 0  # 0 = max_iters
min_lr = 1e-5
# system
device = ''  # '' = cuda if available, else cpu
dtype = 'bfloat16'  # autocast on CUDA; fp32 master weights and optimizer state
teacher_bf16 = True  # on CPU too: the teacher scores under bf16 autocast
student_bf16 = True  # on CPU too: the student's rollout and update under bf16 (fp32 weights)
compile = False
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
LOSSES = ('topk_union', 'fkl', 'rkl', 'jsd', 'pg')

# -----------------------------------------------------------------------------
# the pieces of one step

def amp(device_type, cpu_bf16):
    """bf16 autocast: on CUDA unless dtype is float32, on CPU where a *_bf16 flag asks for it."""
    if device_type == 'cuda' and dtype != 'float32':
        return torch.autocast('cuda', getattr(torch, dtype))
    on_cpu = device_type == 'cpu' and cpu_bf16
    return torch.autocast('cpu', torch.bfloat16) if on_cpu else nullcontext()

def length_bounds(durations):
    """Most tokens a rollout may have: a looping rollout stops after a few extra tokens."""
    return [math.ceil(length_slack + tokens_per_second * d) for d in durations]

@torch.no_grad()
def rollout(model, xa, prompts, tok, max_lens, topk=0, generator=None, bf16=False, xa_mask=None):
    """The model transcribes the audio itself (model.generate, dropout off); one call per prompt
    (the audio-LLM: one call, a prompt per clip). Returns tokens (no prompt, no EOT), ended (EOT
    reached) and, with topk, the top-k ids per step.
    bf16 (CPU): the two largest matmuls (cross-attention K/V, output projection) in bf16."""
    was_training = model.training
    model.eval()
    B = len(prompts)
    tokens, ended, top_ids = [None] * B, [False] * B, [None] * B
    audio_llm = isinstance(model, AudioLLM)
    groups = [list(range(B))] if audio_llm else [[b for b in range(B) if tuple(prompts[b]) == p]
                                                 for p in dict.fromkeys(map(tuple, prompts))]
    for idx in groups:
        kv, project = None, True
        if bf16 and xa.device.type == 'cpu':
            if not audio_llm:
                with torch.autocast('cpu', torch.bfloat16):
                    kv = model.decoder.cross_kv(xa[idx])
                    kv = {m: (k.float(), v.float()) for m, (k, v) in kv.items()}
            project = model.decoder.token_embedding.weight.detach().to(torch.bfloat16)
        m = None if xa_mask is None else xa_mask[idx]
        prompt = [prompts[b] for b in idx] if audio_llm else list(prompts[idx[0]])
        out = model.generate(xa[idx], prompt, tok.eot, max_new_tokens=max_new_tokens,
                             suppress=tok.suppress, suppress_blank=tok.suppress_blank,
                             temperature=temperature, max_lens=[max_lens[b] for b in idx],
                             generator=generator, stop_ngram=ngram_stop, topk=topk, kv_cache=kv,
                             project=project, xa_mask=m)
        for j, b in enumerate(idx):
            tokens[b], ended[b] = out.tokens[j], out.ended[j]
            top_ids[b] = out.top_ids[j] if topk else None
    model.train(was_training)
    return tokens, ended, top_ids

def pack(prompts, seqs, ended, eot):
    """Teacher-forcing batch: tokens (B, L) = prompt + seq, targets (B, L) = seq + [EOT if ended]
    at the positions that predict them, -100 elsewhere. A rollout cut short gets no EOT target."""
    rows = [list(p) + list(s) + [eot] * bool(e) for p, s, e in zip(prompts, seqs, ended)]
    L = max(max(len(r) for r in rows) - 1, 1)
    tokens = torch.full((len(rows), L), eot, dtype=torch.long)
    targets = torch.full((len(rows), L), -100, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, rows)):
        tokens[b, :len(r) - 1] = torch.tensor(r[:-1])
        targets[b, len(p) - 1:len(r) - 1] = torch.tensor(r[len(p):], dtype=torch.long)
    return tokens, targets

def loop_tails(prompts, seqs, ended, n, shape):
    """(B, L) True at the target positions of the last n tokens of each rollout that was cut
    because that n-gram had already occurred (generate's stop_ngram), in pack's layout."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for b, (p, s, e) in enumerate(zip(prompts, seqs, ended)):
        earlier = {tuple(s[i:i + n]) for i in range(len(s) - n)}
        if n and not e and len(s) > n and tuple(s[-n:]) in earlier:
            mask[b, len(p) - 1 + len(s) - n:len(p) - 1 + len(s)] = True
    return mask

def masked_log_softmax(logits, suppress=()):
    """Log-probabilities with the decoding's control tokens at -inf, on both sides alike."""
    logits = logits.float()
    if len(suppress):
        idx = torch.as_tensor(list(suppress), device=logits.device)
        logits = logits.index_fill(-1, idx, -math.inf)
    return F.log_softmax(logits, dim=-1)

def union_support(ids_s, lp_t, k, t2s=None, s2t=None):
    """U_t = the student's top-k ids (N, k) then the teacher's (N, 2k), and which entries count:
    not a duplicate of a student id, not a masked token. dup: teacher ids the student has too.
    The text route's maps (token_map; -1: no token of that string): U_t in student
    ids, the teacher's top-k mapped by t2s, the teacher read at s2t[U_t]; unmapped ones don't
    count."""
    ids_t = lp_t.topk(k, dim=-1).indices
    ids_t = ids_t if t2s is None else t2s[ids_t]
    dup = (ids_t[:, :, None] == ids_s[:, None, :]).any(-1)
    union = torch.cat([ids_s, ids_t], dim=1)
    at_t = union if s2t is None else s2t[union.clamp(min=0)]
    valid = (torch.cat([torch.ones_like(dup), ~dup], dim=1) & (union >= 0) & (at_t >= 0) &
             lp_t.gather(1, at_t.clamp(min=0)).isfinite())
    return union.clamp(min=0), valid, dup

def kl(lp_p, lp_q):
    """KL(p || q) per row from log-probabilities; entries where p = 0 contribute 0 (and no nan)."""
    fin = lp_p.isfinite()
    d = lp_p.exp() * (lp_p.masked_fill(~fin, 0.0) - lp_q.masked_fill(~fin, 0.0))
    return torch.where(fin, d, 0.0).sum(-1)

def topk_union_kl(s_u, t_u, valid):
    """The paper's loss per position from the two models' scores on U_t (N, 2k): forward KL with
    both renormalised on the valid entries; positions with < 2 valid entries give 0, do not count.
    Scores may be log-probabilities or logits: renormalising cancels the normaliser."""
    ok = valid.sum(1) >= 2
    s = F.log_softmax((s_u / tau).masked_fill(~valid, -math.inf), dim=-1)
    t = F.log_softmax((t_u / tau).masked_fill(~valid, -math.inf), dim=-1)
    return tau ** 2 * torch.where(ok, kl(t, s), 0.0), ok

def opd_loss(lp_s, lp_t, x, loss='topk_union', k=32):
    """Per-position losses (N,) and which positions count, from the student's (with grad) and the
    teacher's full masked log-probabilities (N, V); x (N,) are the rollout's tokens."""
    ok = torch.ones(len(x), dtype=torch.bool, device=lp_s.device)
    if loss == 'topk_union':  # log-probabilities on both sides (the released code mixes in logits)
        ids_s = lp_s.detach().topk(min(k, lp_s.shape[-1]), -1).indices
        union, valid, _ = union_support(ids_s, lp_t, k)
        return topk_union_kl(lp_s.gather(1, union), lp_t.gather(1, union), valid)
    if loss == 'pg':  # tinker: REINFORCE on log p_S(x) with the reward -(log p_S(x) - log p_T(x))
        lps_x = lp_s.gather(1, x[:, None]).squeeze(1)
        advantage = lp_t.gather(1, x[:, None]).squeeze(1) - lps_x.detach()
        return -advantage * lps_x, ok
    s, t = F.log_softmax(lp_s / tau, dim=-1), F.log_softmax(lp_t / tau, dim=-1)
    if loss == 'fkl' or (loss == 'jsd' and beta == 0):
        div = kl(t, s)
    elif loss == 'rkl' or (loss == 'jsd' and beta == 1):
        div = kl(s, t)
    else:  # jsd (GKD): M = beta p_T + (1 - beta) p_S; beta KL(T || M) + (1 - beta) KL(S || M)
        fin = t.isfinite()  # masked ids: -inf on both sides (logsumexp of two -inf: nan gradient)
        m = torch.logsumexp(torch.stack([s.masked_fill(~fin, 0) + math.log(1 - beta),
                                         t.masked_fill(~fin, 0) + math.log(beta)]), 0)
        div = beta * kl(t, m) + (1 - beta) * kl(s, m)
    return tau ** 2 * div, ok

class Rescore(nn.Module):
    """The student's decoder with gradients (what DDP wraps and torch.compile compiles). Given ids
    (N, m) for the N positions where select (B, L) is True: the logits of those ids only (N, m)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens, xa, select=None, ids=None, xa_mask=None):
        x = self.model.decoder(tokens, xa, project=ids is None, xa_mask=xa_mask)
        if ids is None:
            return x
        w = self.model.decoder.token_embedding.weight  # tied output embedding
        return torch.einsum('nd,nmd->nm', x[select], w[ids].to(x.dtype)).float()

def unlikelihood(lp_x):
    """-log(1 - p) for p = exp(lp_x): the loss that pushes a looping token's probability down."""
    return -torch.log1p(-lp_x.exp().clamp(max=1 - 1e-6))

def union_unlikelihood(s_u, union, valid, x):
    """unlikelihood of the rollout's own token x, p_S renormalised on U_t (s_u: the student's
    logits of union's ids), and whether x is in U_t at all."""
    lp_u = F.log_softmax(s_u.float().masked_fill(~valid, -math.inf), dim=-1)
    hit = (union == x[:, None]) & valid
    return unlikelihood(lp_u.gather(1, hit.float().argmax(1, keepdim=True)).squeeze(1)), hit.any(1)

def full_kls(lp_s, lp_t):
    """The diagnostics' full-vocabulary KL(S || T) and KL(T || S), summed over positions."""
    a, b = lp_s.clamp(min=-1e4), lp_t.clamp(min=-1e4)  # masked ids: 0 * 0
    return dict(kl_st=(a.exp() * (a - b)).sum().item(), kl_ts=(b.exp() * (b - a)).sum().item(),
                kl_positions=len(lp_s))

def now(device_type):
    if device_type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter()

def opd_step(student, teacher, tok, rescore, xa_t, xa_s, prompts, durations, generator=None,
             full_diag=False, frames=None):
    """Steps 1-4 of one OPD batch on this rank. xa_t / xa_s: the teacher's / student's encoder
    outputs; frames: the real mel frames (B, T) of a padded batch, or None. Returns (summed
    per-position loss with grad, positions that count, stats)."""
    dev, k = xa_t.device.type, min(topk, student.dims.n_vocab)
    m_t, m_s = teacher.encoder.frames_mask(frames), student.encoder.frames_mask(frames)
    union_only = loss == 'topk_union'
    t0 = now(dev)
    # 1. rollout: the student's own transcripts, and its top-k ids at every step
    seqs, ended, top_s = rollout(student, xa_s, prompts, tok, length_bounds(durations),
                                 k if union_only else 0, generator, student_bf16, m_s)
    tokens, targets = (t.to(xa_t.device) for t in pack(prompts, seqs, ended, tok.eot))
    mask = targets != -100  # the scored positions: every rollout token, and EOT where it ended
    x = targets[mask]
    t1 = now(dev)
    # 2. teacher scores: one teacher-forced pass, full masked log-probabilities (N, V)
    with torch.no_grad(), amp(dev, teacher_bf16):
        lp_t = masked_log_softmax(teacher.decoder(tokens, xa_t, xa_mask=m_t)[mask],
                                  tok.suppress)
    t2 = now(dev)
    if union_only:
        # 3. student re-scores the same tokens, with gradients: only the logits of U_t's 2k ids.
        # Renormalising on U_t cancels log Z, so this equals opd_loss on full log-probabilities
        # (tests/test_distill.py checks the loss and the gradients)
        union, valid, dup = union_support(torch.cat(top_s).to(lp_t.device), lp_t, k)
        with amp(dev, student_bf16):
            s_u = rescore(tokens, xa_s, select=mask, ids=union, xa_mask=m_s)
        # 4. union top-k forward KL per position
        per_pos, ok = topk_union_kl(s_u, lp_t.gather(1, union), valid)
    else:
        # 3. student re-scores, with gradients: full masked log-probabilities (N, V)
        with amp(dev, student_bf16):
            lp_s = masked_log_softmax(rescore(tokens, xa_s, xa_mask=m_s)[mask], tok.suppress)
        # 4. the chosen divergence per position (opd_loss)
        per_pos, ok = opd_loss(lp_s, lp_t, x, loss, k)
        _, valid, dup = union_support(lp_s.detach().topk(k, dim=-1).indices, lp_t, k)  # for VUSS
    # anti-loop (off unless loop_unlikelihood > 0): where the rollout repeated an n-gram, the
    # teacher forced onto the loop tends to continue it: those tokens get -log(1 - p_S) instead
    loops = loop_tails(prompts, seqs, ended, ngram_stop, targets.shape)
    loop = loops[mask.cpu()].to(per_pos.device)
    if loop_unlikelihood > 0 and loop.any():
        if union_only:
            ul, inside = union_unlikelihood(s_u, union, valid, x)
            loop = loop & inside
        else:
            ul = unlikelihood(lp_s.gather(1, x[:, None]).squeeze(1))
        per_pos, ok = torch.where(loop, loop_unlikelihood * ul, per_pos), ok | loop
    # diagnostics: VUSS (valid tokens in U_t) and overlap |S top-k & T top-k| / k, and on log
    # steps the full-vocabulary KLs (one more student forward for topk_union)
    stats = dict(vuss=valid.sum().item(), overlap=dup.float().mean(1).sum().item(),
                 positions=len(x), rollout_len=sum(map(len, seqs)), ended=sum(ended),
                 rollouts=len(seqs), looped=loops.any(1).sum().item(), t_rollout=t1 - t0,
                 t_teacher=t2 - t1)
    if full_diag:
        with torch.no_grad():
            if union_only:
                lp_s = student.decoder(tokens, xa_s, xa_mask=m_s)[mask]
                lp_s = masked_log_softmax(lp_s, tok.suppress)
            stats.update(full_kls(lp_s.detach(), lp_t))
    return per_pos.sum(), ok.sum(), stats

def opd_step_text(student, teacher, s_tok, t_tok, maps, rescore, xa_t, xa_s, s_prompts, t_prompts,
                  durations, refs, m_t=None, m_s=None, generator=None, full_diag=False):
    """Steps 1-4 through text, for a student with its own tokenizer and prompt (the audio-LLM).
    maps: (teacher -> student, student -> teacher) ids, token_map; refs: the labels,
    used only where a rollout is empty; m_t / m_s: the real encoder frames each model reads.
    With one tokenizer and prompt on both sides this is opd_step (tests/test_audiollm.py)."""
    dev, k = xa_t.device.type, min(topk, student.dims.n_vocab)
    t2s, s2t = (m.to(xa_t.device) for m in maps)
    t0 = now(dev)
    # 1. rollout: the student's own transcripts (cut at its stop token), its top-k ids per step
    seqs, ended0, top_s = rollout(student, xa_s, s_prompts, s_tok, length_bounds(durations), k,
                                  generator, student_bf16, m_s)
    # 2a. to text, re-tokenized by the teacher (an empty rollout: the reference, if there is one),
    # and the teacher's tokens mapped back to student ids: a rollout with one the student lacks
    # is dropped
    texts = [s_tok.decode(s) for s in seqs]
    back = [not t.strip() and bool(r) for t, r in zip(texts, refs)]
    texts = [r if b else t for t, r, b in zip(texts, refs, back)]
    ended = [e or b for e, b in zip(ended0, back)]
    t_seqs = [t_tok.encode_text(t) if t else [] for t in texts]
    s_seqs = [t2s[torch.tensor(s, dtype=torch.long)].tolist() for s in t_seqs]
    keep = [b for b, s in enumerate(s_seqs) if min(s, default=0) >= 0]
    same = [s_seqs[b] == seqs[b] for b in keep]  # else the rollout's top-k rows are misaligned
    sub = lambda xs: None if xs is None else (xs[keep] if torch.is_tensor(xs) else
                                             [xs[b] for b in keep])
    stats = dict(positions=0, rollout_len=sum(map(len, seqs)), ended=sum(ended0),
                 rollouts=len(seqs), mismatch=sum(s != q for s, q in zip(s_seqs, seqs)),
                 dropped=len(seqs) - len(keep), looped=loop_tails(
                     [[]] * len(seqs), seqs, ended0, ngram_stop, (len(seqs), max_new_tokens + 1)
                 ).any(1).sum().item())
    if not keep:  # nothing to score (one process only: DDP would wait for this rank's forward)
        return sum(p.sum() for p in rescore.parameters()) * 0.0, torch.tensor(0), stats
    tokens_t, targets_t = pack(sub(t_prompts), sub(t_seqs), sub(ended), t_tok.eot)
    tokens_s, targets_s = pack(sub(s_prompts), sub(s_seqs), sub(ended), s_tok.eot)
    tokens_t, tokens_s = tokens_t.to(xa_t.device), tokens_s.to(xa_t.device)
    mask_t, mask_s = (targets_t != -100).to(xa_t.device), (targets_s != -100).to(xa_t.device)
    xs, ms = sub(xa_s), sub(m_s)
    t1 = now(dev)
    # 2b. teacher scores, under its own prompt: full masked log-probabilities (N, V_teacher)
    with torch.no_grad(), amp(dev, teacher_bf16):
        lp_t = masked_log_softmax(teacher.decoder(tokens_t, sub(xa_t), xa_mask=sub(m_t))[mask_t],
                                  t_tok.suppress)
    t2 = now(dev)
    # 3. student re-scores the teacher's tokens mapped back, with gradients, on U_t's ids only
    # (as opd_step). Its top-k: the rollout's, or where the re-tokenization differs, recomputed
    redo = [j for j, ok in enumerate(same) if not ok]
    if redo:
        with torch.no_grad(), amp(dev, student_bf16):
            lp = student.decoder(tokens_s[redo], xs[redo], xa_mask=None if ms is None else ms[redo])
            top = masked_log_softmax(lp, s_tok.suppress).topk(k, dim=-1).indices
        top = dict(zip(redo, (t[m] for t, m in zip(top, mask_s[redo]))))
    ids_s = torch.cat([top_s[b].to(lp_t.device) if ok else top[j]
                       for j, (b, ok) in enumerate(zip(keep, same))])
    union, valid, dup = union_support(ids_s, lp_t, k, t2s, s2t)
    with amp(dev, student_bf16):
        s_u = rescore(tokens_s, xs, select=mask_s, ids=union, xa_mask=ms)
    # 4. union top-k forward KL per position; a position whose teacher top-k keeps < 2 student
    # ids does not count
    per_pos, ok = topk_union_kl(s_u, lp_t.gather(1, s2t[union].clamp(min=0)), valid)
    mapped = (dup | valid[:, k:]).sum(1)  # the teacher's top-k ids with a student counterpart
    per_pos, ok = torch.where(mapped >= 2, per_pos, 0.0), ok & (mapped >= 2)
    # anti-loop, as in opd_step: the tail of a rollout cut at a repeated n-gram is trained away
    loop = loop_tails(sub(s_prompts), sub(s_seqs), sub(ended), ngram_stop, targets_s.shape)
    loop = loop[mask_s.cpu()].to(per_pos.device)
    if loop_unlikelihood > 0 and loop.any():
        ul, inside = union_unlikelihood(s_u, union, valid, targets_s.to(mask_s.device)[mask_s])
        loop = loop & inside
        per_pos, ok = torch.where(loop, loop_unlikelihood * ul, per_pos), ok | loop
    stats.update(vuss=valid.sum().item(), overlap=dup.float().mean(1).sum().item(),
                 positions=len(lp_t), unmapped=(k * len(lp_t) - mapped.sum()).item(),
                 t_rollout=t1 - t0, t_teacher=t2 - t1)
    if full_diag:  # the full-vocabulary KLs over the student's vocabulary
        with torch.no_grad():
            lp_s = masked_log_softmax(student.decoder(tokens_s, xs, xa_mask=ms)[mask_s],
                                      s_tok.suppress)
            stats.update(full_kls(lp_s, lp_t[:, s2t.clamp(min=0)].masked_fill(s2t < 0, -math.inf)))
    return per_pos.sum(), ok.sum(), stats

def fail(msg):
    print(f"distill.py: error: {msg}", file=sys.stderr)
    sys.exit(1)

# -----------------------------------------------------------------------------

def main():
    if loss not in LOSSES:
        fail(f"loss={loss!r}: expected one of {', '.join(LOSSES)}")
    for k in ('batch_size', 'eval_batch_size', 'log_interval', 'topk', 'max_new_tokens'):
        if globals()[k] <= 0:
            fail(f"{k}={globals()[k]}: must be positive")
    if max_iters < 0 or learning_rate <= 0 or tau <= 0 or temperature < 0:
        fail(f"max_iters={max_iters}, learning_rate={learning_rate}, tau={tau}, temperature="
             f"{temperature}: need max_iters >= 0, learning_rate > 0, tau > 0, temperature >= 0")
    config = {k: globals()[k] for k in config_keys}
    ddp = int(os.environ.get('RANK', -1)) != -1
    dev = device or ('cuda' if torch.cuda.is_available() else 'cpu')
    if dev.startswith('cuda') and not torch.cuda.is_available():
        fail(f"device={dev!r} but CUDA is not available to torch {torch.__version__}")
    rank, world_size = 0, 1
    if ddp:
        rank, world_size = int(os.environ['RANK']), int(os.environ['WORLD_SIZE'])
        if dev.startswith('cuda'):
            dev = f"cuda:{os.environ['LOCAL_RANK']}"
            torch.cuda.set_device(dev)
        dist.init_process_group(backend='nccl' if dev.startswith('cuda') else 'gloo')
    master, device_type = rank == 0, 'cuda' if dev.startswith('cuda') else 'cpu'
    torch.manual_seed(seed)
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    os.makedirs(out_dir, exist_ok=True)

    # teacher (frozen, on every rank, never wrapped in DDP) and student (encoder frozen)
    teacher, tok, _ = load_checkpoint(teacher_path, dev)
    teacher.requires_grad_(False)
    path = ckpt_path if init_from == 'resume' else init_from
    if not os.path.exists(path):
        fail(f"init_from={init_from!r}: {path} does not exist")
    student, student_tok, checkpoint = load_checkpoint(path)
    # the text route (opd_step_text): a student with its own tokenizer or prompt (the audio-LLM)
    audio_llm = isinstance(student, AudioLLM)
    text_route = audio_llm or student_tok.to_dict() != tok.to_dict()
    if text_route and loss != 'topk_union':
        fail(f"{path}: the text route (an audio-LLM student, or another tokenizer) takes "
             f"loss='topk_union'")
    maps = (token_map(tok, student_tok), token_map(student_tok, tok))
    if init_from == 'resume' and checkpoint['config']['teacher_path'] != teacher_path:
        fail(f"{path} was distilled from {checkpoint['config']['teacher_path']}, "
             f"not {teacher_path}")
    frozen = (checkpoint or {}).get('frozen', [])
    checkpoint = checkpoint if init_from == 'resume' else None
    if student.dims.dropout:  # rollouts and updates alike without dropout
        weights = student.state_dict()
        student = type(student)(dataclasses.replace(student.dims, dropout=0.0))
        student.load_state_dict(weights)
    frozen = sorted(set(frozen) | {n for n, _ in student.named_parameters()
                                   if n.startswith(('encoder.', 'ctc_head.'))})
    for n, p in student.named_parameters():
        p.requires_grad_(n not in frozen)
    student.to(dev).train()
    if not text_route and student.dims.n_vocab != teacher.dims.n_vocab:
        fail(f"student vocab {student.dims.n_vocab} != teacher vocab {teacher.dims.n_vocab}")
    n_frames = evaluate.whisper_frames(student, tok)  # 3000 for Whisper weights, else None
    sd_s, sd_t = student.encoder.state_dict(), teacher.encoder.state_dict()
    shared = sd_s.keys() == sd_t.keys() and all(torch.equal(sd_s[k], sd_t[k]) for k in sd_s)
    def cache_of(model):  # frozen: each clip's outputs cached when every mel has the same length
        if n_frames:
            return evaluate.EncoderCache(model.encoder, encoder_cache_dir, amp(device_type, True))
    cache_t = cache_of(teacher)
    cache_s = cache_t if shared else cache_of(student)

    # data: the audio only
    def fits(row):
        n_tok = len(tok.sot_sequence(row.get('lang'))) + max_new_tokens
        if audio_llm:  # its prompt holds the audio tokens too
            n_tok = max(n_tok, len(student_tok.prompt(row['duration'] * 100)) + max_new_tokens)
        return row['duration'] * 100 <= student.dims.n_audio_ctx * student.dims.conv_stride and \
            n_tok <= student.dims.n_text_ctx
    rows = data.check_audio(data.read_manifest(train_manifest))  # every clip's header, now
    kept = [r for r in rows if fits(r)]
    train_rows = [dict(r, text=None) for r in kept]
    refs = [r.get('text') for r in kept]  # the text route's empty rollouts only
    if master and len(kept) < len(rows):
        print(f"skipping {len(rows) - len(train_rows)} utterances too long for the student")
    if not train_rows:
        fail(f"no usable training utterances in {train_manifest}")
    val_rows = data.read_manifest(val_manifest)[:val_max_utts] if val_manifest else []
    data.check_audio(val_rows)
    batches = data.Batches(train_rows, tok, batch_size=batch_size, seed=seed, rank=rank,
                           world_size=world_size, n_mels=student.dims.n_mels, n_frames=n_frames)

    # optimizer: fp32 master weights, weight decay on matrices only
    params = [p for p in student.parameters() if p.requires_grad]
    groups = [{'params': [p for p in params if p.dim() >= 2], 'weight_decay': weight_decay},
              {'params': [p for p in params if p.dim() < 2], 'weight_decay': 0.0}]
    optimizer = torch.optim.AdamW(groups, lr=learning_rate, betas=(beta1, beta2))
    iter_num, best_val_wer, loader = 0, float('inf'), {'epoch': 0, 'step': 0}
    generator = torch.Generator(device=dev).manual_seed(seed + rank)  # sampled rollouts
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint['optimizer'])
        iter_num, best_val_wer = checkpoint['iter_num'], checkpoint['best_val_wer']
        loader, gens = checkpoint['loader'], checkpoint['rng']['generator']
        if master:  # the records past the checkpoint are done again
            trim_log(os.path.join(out_dir, 'log.jsonl'), iter_num)
        generator.set_state(gens[rank % len(gens)])
        torch.set_rng_state(checkpoint['rng']['torch'])
        checkpoint = None
    rescore = Rescore(student)
    if compile:
        rescore = torch.compile(rescore, dynamic=True)
    if ddp:
        local = [int(os.environ['LOCAL_RANK'])] if device_type == 'cuda' else None
        rescore = DDP(rescore, device_ids=local)

    def get_lr(it):
        if not decay_lr:
            return learning_rate
        if it < warmup_iters:
            return learning_rate * (it + 1) / (warmup_iters + 1)
        ratio = min(1.0, (it - warmup_iters) / max(1, (lr_decay_iters or max_iters) - warmup_iters))
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (learning_rate - min_lr)

    def get_batch():  # follows the loader position, so a resumed run reads the same batches
        plan = batches.plan(loader['epoch'])
        if loader['step'] >= len(plan):
            loader.update(epoch=loader['epoch'] + 1, step=0)
            plan = batches.plan(loader['epoch'])
        loader['step'] += 1
        return batches.collate(plan[loader['step'] - 1])

    def save_checkpoint():
        gens = [None] * world_size
        if ddp:
            dist.all_gather_object(gens, generator.get_state())
        else:
            gens = [generator.get_state()]
        if master:
            ckpt = {'model': student.state_dict(), 'optimizer': optimizer.state_dict(),
                    'model_args': dataclasses.asdict(student.dims), 'iter_num': iter_num,
                    'best_val_wer': best_val_wer, 'config': config,
                    'tokenizer': student_tok.to_dict(),
                    'frozen': frozen, 'loader': dict(loader),
                    'rng': {'generator': gens, 'torch': torch.get_rng_state()}}
            atomic_save(ckpt, ckpt_path)
            print(f"saved checkpoint to {ckpt_path}")

    def log_json(record):
        if master:
            with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')

    if master:
        print(f"opd ({loss}): student {student.get_num_params() / 1e6:.1f}M params "
              f"({sum(p.numel() for p in params) / 1e6:.1f}M trained), teacher "
              f"{teacher.get_num_params() / 1e6:.1f}M, {'shared ' * shared}frozen encoder, "
              f"{len(train_rows)} utterances, {world_size} process(es)")
    keys = ['loss', 'kl_st', 'kl_ts', 'kl_positions', 'vuss', 'overlap', 'positions', 'rollout_len',
            'ended', 'looped', 'rollouts', 't_rollout', 't_teacher', 't_step', 'mismatch',
            'unmapped', 'dropped']
    sums, t_start, saved = dict.fromkeys(keys, 0.0), time.time(), False
    start_iter = last_logged = iter_num
    while True:
        # evaluate and checkpoint
        last = iter_num >= max_iters
        if (last or (eval_interval and iter_num % eval_interval == 0)) and iter_num > start_iter:
            wer = None
            if master and val_rows:
                hyps = evaluate.transcribe(student, student_tok, val_rows, eval_batch_size,
                                           encode=cache_s)
                wer = evaluate.report(val_rows, hyps, 1.0)['wer']
                print(f"iter {iter_num}: val WER {100 * wer:.2f}% on {len(val_rows)} utts")
                log_json({'iter': iter_num, 'val_wer': wer,
                          'minutes': (time.time() - t_start) / 60})
            improved = [wer is not None and wer < best_val_wer]
            if ddp:
                dist.broadcast_object_list(improved, src=0)  # every rank takes part in the save
            best_val_wer = min(best_val_wer, wer if wer is not None else best_val_wer)
            if improved[0] or always_save_checkpoint or (last and not saved):
                save_checkpoint()
                saved = True
        if last:
            break
        lr = get_lr(iter_num)
        for group in optimizer.param_groups:
            group['lr'] = lr
        t0 = now(device_type)
        batch = get_batch()
        mel, paths = batch['mel'].to(dev), batch['audio']
        # mels padded to the longest in the batch: the padding is masked (Whisper's 30-s window
        # is not: the model was trained reading it)
        frames = None if n_frames else length_mask(batch['mel_lengths'].to(dev), mel.shape[2])
        with torch.no_grad():
            xa_t = cache_t(mel, paths) if cache_t else teacher.encoder(mel, frames)
            if shared:
                xa_s = xa_t
            else:
                xa_s = cache_s(mel, paths) if cache_s else student.encoder(mel, frames)
        prompts = [tok.sot_sequence(train_rows[i].get('lang')) for i in batch['index']]
        # the full-vocabulary KLs on the last step before each log line
        full_diag = (iter_num + 1) % log_interval == 0 or iter_num + 1 == max_iters
        # steps 1-4: rollout, teacher scores, student re-scores, per-position divergence
        if text_route:  # the audio-LLM: a prompt per clip; its adapter reads the real frames only
            real = length_mask(batch['mel_lengths'].to(dev), mel.shape[2])
            s_prompts = ([student_tok.prompt(n) for n in batch['mel_lengths'].tolist()] if audio_llm
                         else [student_tok.sot_sequence(train_rows[i].get('lang'))
                               for i in batch['index']])
            loss_sum, n, stats = opd_step_text(
                student, teacher, student_tok, tok, maps, rescore, xa_t, xa_s, s_prompts, prompts,
                batch['duration'].tolist(), [refs[i] for i in batch['index']],
                teacher.encoder.frames_mask(frames),
                student.encoder.frames_mask(real if audio_llm else frames), generator, full_diag)
        else:
            loss_sum, n, stats = opd_step(student, teacher, tok, rescore, xa_t, xa_s, prompts,
                                          batch['duration'].tolist(), generator, full_diag, frames)
        # 5. update. The mean is over the positions of the GLOBAL batch: every rank divides by the
        # global count times the world size (DDP averages gradients): one process's update
        count = n.float()
        if ddp:
            dist.all_reduce(count)
        step_loss = loss_sum / count.clamp(min=1) * world_size
        step_loss.backward()
        value = torch.tensor([step_loss.item() / world_size], device=dev)
        if ddp:
            dist.all_reduce(value)
        if not math.isfinite(value.item()):
            fail(f"iter {iter_num}: non-finite loss ({value.item()}); stopping without saving a "
                 f"checkpoint (lower learning_rate, check the data, or try dtype='float32')")
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        iter_num += 1
        stats.update(loss=value.item(), t_step=now(device_type) - t0)
        for k in keys:
            sums[k] += stats.get(k, 0.0)
        # log
        if iter_num % log_interval == 0 or iter_num == max_iters:
            tot = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=dev)
            if ddp:
                dist.all_reduce(tot)
            s, steps = dict(zip(keys, tot.tolist())), world_size * (iter_num - last_logged)
            pos, ro = max(s['positions'], 1), max(s['rollouts'], 1)
            kl_pos = max(s['kl_positions'], 1)
            record = {'iter': iter_num, 'loss': s['loss'] / steps, 'lr': lr,
                      'kl_st': s['kl_st'] / kl_pos, 'kl_ts': s['kl_ts'] / kl_pos,
                      'vuss': s['vuss'] / pos, 'overlap': s['overlap'] / pos,
                      'rollout_len': s['rollout_len'] / ro, 'eot_frac': s['ended'] / ro,
                      'loop_frac': s['looped'] / ro, 'ms_rollout': 1000 * s['t_rollout'] / steps,
                      'ms_teacher': 1000 * s['t_teacher'] / steps,
                      'ms_step': 1000 * s['t_step'] / steps,
                      'minutes': (time.time() - t_start) / 60}
            if text_route:  # rollouts the teacher's tokenizer segments otherwise; ids dropped
                record.update(retokenize_mismatch_ratio=s['mismatch'] / ro,
                              unmapped=s['unmapped'] / steps, dropped_rollouts=s['dropped'])
            if master:
                print(f"iter {iter_num}: " + ', '.join(f"{k} {v:.4g}" for k, v in record.items()
                                                       if k != 'iter'))
            log_json(record)
            sums, last_logged = dict.fromkeys(keys, 0.0), iter_num
    if ddp:
        dist.barrier()  # no rank tears the group down while the master still writes its checkpoint
        del rescore  # DDP sits in reference cycles: free it while its group exists (gloo aborts)
        gc.collect()
        dist.destroy_process_group()

if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    try:
        main()
    except (OSError, ValueError) as e:  # bad input (audio, manifest, checkpoint): one line
        fail(str(e))
