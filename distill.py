"""
On-policy distillation (OPD) of a small student from a frozen teacher, on unlabeled audio:

    python distill.py config/distill_demo_opd.py
    python distill.py config/distill_toy.py --loss=rkl --temperature=1.0
    torchrun --standalone --nproc_per_node=2 distill.py config/distill_demo_opd.py

One step, as the paper states it (opd_step, then the update in the loop at the bottom):
1. rollout: the student transcribes the audio itself (greedy, KV-cached, no grad, control tokens
   masked), keeping its top-k ids at every step;
2. teacher scores: the frozen teacher, teacher-forced on [its prompt + the student's tokens + EOT];
3. student re-scores: the same tokens, with gradients;
4. union top-k forward KL: at each position U_t = student top-k | teacher top-k, both renormalised
   on U_t, KL(p_T || p_S), averaged over every scored position of the (global) batch;
5. update: AdamW on the student's decoder (fp32 master weights).
Both student families take the same step. A smaller Whisper reads the teacher's own tokens; an
audio-LLM (config/distill_ark_opd.py) has its own tokenizer and prompt, so between steps 1 and 2
its rollout goes to the teacher as text (retokenize), and top-k ids cross by token string.
The other objectives (fkl, rkl, jsd, pg) are small pure functions (divergence).
"""
import math
import os
import time
from dataclasses import dataclass, fields
from typing import NamedTuple, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import common
import data
import evaluate
from checkpoint import load_checkpoint
from decoding import generate
from model import AudioLLM, length_mask
from tokenizer import token_map

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
tokens_per_second = 6.0  # a rollout stops after 8 + tokens_per_second * duration tokens
# anti-loop measures (off unless a recipe turns them on)
ngram_stop = 0  # > 0: cut a rollout where an n-gram of this size repeats (no EOT target then)
loop_unlikelihood = 0.0  # > 0: that n-gram's tokens get w * -log(1 - p_S) instead of the KL
# AdamW and the schedule (the paper's launcher defaults)
learning_rate = 1e-4
max_iters = 500
weight_decay = 0.005
beta2 = 0.95
grad_clip = 1.0
decay_lr = True
warmup_iters = 50
lr_decay_iters = 0  # 0 = max_iters
min_lr = 1e-5
# system
device = ''  # '' = cuda if available, else cpu
dtype = 'bfloat16'  # autocast on CUDA; fp32 master weights and optimizer state
cpu_bf16 = True  # on CPU too, where it has bf16 kernels: rollout, teacher, update under bf16
compile = False
seed = 1337
# -----------------------------------------------------------------------------
config_keys = [k for k, v in globals().items()
               if not k.startswith('_') and isinstance(v, (int, float, bool, str))]
LOSSES = ('topk_union', 'fkl', 'rkl', 'jsd', 'pg')
STATS = ('loss', 'kl_st', 'kl_ts', 'kl_positions', 'vuss', 'overlap', 'positions', 'rollout_len',
         'ended', 'looped', 'rollouts', 't_rollout', 't_teacher', 't_step', 'mismatch', 'unmapped',
         'topk_ids', 'truncated')  # summed over steps and ranks between log lines

@dataclass(frozen=True)
class Step:
    """The settings one OPD step uses (the loop builds it from the config globals)."""
    loss: str = 'topk_union'
    topk: int = 32
    tau: float = 1.0
    beta: float = 0.5
    temperature: float = 0.0
    max_new_tokens: int = 64
    ngram_stop: int = 0
    loop_unlikelihood: float = 0.0
    dtype: str = 'bfloat16'
    cpu_bf16: bool = True

class Side(NamedTuple):
    """One model's view of a batch: the model, its tokenizer, its encoder outputs xa (B, S, D),
    the real encoder frames (B, S) or None, and one prompt per clip."""
    model: nn.Module
    tok: object
    xa: torch.Tensor
    xa_mask: Optional[torch.Tensor]
    prompts: list

# -----------------------------------------------------------------------------
# the pieces of one step

def length_bounds(durations, tokens_per_second=6.0, length_slack=8):
    """Most tokens a rollout may have: a looping rollout stops after a few extra tokens."""
    return [math.ceil(length_slack + tokens_per_second * d) for d in durations]

@torch.no_grad()
def rollout(model, tok, xa, prompts, max_lens, hp, topk=0, generator=None, xa_mask=None):
    """The model transcribes the audio itself (model.generate, dropout off); one call per distinct
    prompt (the audio-LLM: one call, a prompt per clip). Returns tokens (no prompt, no EOT), ended
    (EOT reached) and, with topk, the top-k ids per step. Under CPU bf16 the two largest matmuls
    (cross-attention K/V, output projection) run in bf16."""
    was_training = model.training
    model.eval()
    B, audio_llm = len(prompts), isinstance(model, AudioLLM)
    tokens, ended, top_ids = [None] * B, [False] * B, [None] * B
    groups = [list(range(B))] if audio_llm else [[b for b in range(B) if tuple(prompts[b]) == p]
                                                 for p in dict.fromkeys(map(tuple, prompts))]
    for idx in groups:
        kv, project = None, True
        if hp.cpu_bf16 and xa.device.type == 'cpu':
            if not audio_llm:
                with torch.autocast('cpu', torch.bfloat16):
                    kv = model.decoder.cross_kv(xa[idx])
                    kv = {m: (k.float(), v.float()) for m, (k, v) in kv.items()}
            project = model.decoder.token_embedding.weight.detach().to(torch.bfloat16)
        out = generate(model, xa[idx], [prompts[b] for b in idx] if audio_llm else prompts[idx[0]],
                       tok.eot, max_new_tokens=hp.max_new_tokens, suppress=tok.suppress,
                       suppress_blank=tok.suppress_blank, temperature=hp.temperature,
                       max_lens=[max_lens[b] for b in idx], generator=generator,
                       stop_ngram=hp.ngram_stop, topk=topk, kv_cache=kv, project=project,
                       xa_mask=None if xa_mask is None else xa_mask[idx])
        for j, b in enumerate(idx):
            tokens[b], ended[b] = out.tokens[j], out.ended[j]
            top_ids[b] = out.top_ids[j] if topk else None
    model.train(was_training)
    return tokens, ended, top_ids

def retokenize(seqs, s_tok, t_tok, t2s):
    """The rollout as a teacher with another tokenizer reads it: decoded to text, encoded by the
    teacher, and those tokens mapped back to student ids (what the student is re-scored on) ->
    (teacher ids, student ids, cut). As the paper does, a rollout is cut before the first teacher
    token that no student token spells (cut: True there; the rest is not scored, nor its stop)."""
    t_seqs = [t_tok.encode_text(text) if (text := s_tok.decode(s)) else [] for s in seqs]
    s_seqs = [t2s[torch.tensor(t, dtype=torch.long)].tolist() for t in t_seqs]
    ends = [s.index(-1) if -1 in s else len(s) for s in s_seqs]
    return ([t[:n] for t, n in zip(t_seqs, ends)], [s[:n] for s, n in zip(s_seqs, ends)],
            [n < len(s) for s, n in zip(s_seqs, ends)])

def retokenized_topk(S, tokens, mask, top_s, seqs, s_seqs, ended, k, hp):
    """The student's top-k ids at each scored position after retokenize: the rollout's, or
    recomputed where the teacher's segmentation differs (the rollout's rows would be misaligned).
    As the paper's support, the stop token is left out (id -2: no token) except at the position
    where the rollout generated it."""
    n = mask.sum(1).tolist()
    top = [t[:n[b]].to(tokens.device) for b, t in enumerate(top_s)]
    redo = [b for b, (s, q) in enumerate(zip(s_seqs, seqs)) if s != q[:len(s)]]
    if redo:
        with torch.no_grad(), common.autocast(tokens.device.type, hp.dtype, hp.cpu_bf16):
            m = None if S.xa_mask is None else S.xa_mask[redo]
            lp = masked_log_softmax(S.model.decoder(tokens[redo], S.xa[redo], xa_mask=m),
                                    S.tok.suppress)
        for b, t in zip(redo, lp.topk(k, dim=-1).indices):
            top[b] = t[mask[b]]
    for b, t in enumerate(top):
        stop = t == S.tok.eot
        stop[-1:] &= not ended[b]
        top[b] = t.masked_fill(stop, -2)
    return top

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

def looped(s, e, n):
    """Whether a rollout was cut because its last n-gram had already occurred (stop_ngram)."""
    return bool(n) and not e and len(s) > n and tuple(s[-n:]) in {
        tuple(s[i:i + n]) for i in range(len(s) - n)}

def loop_tails(prompts, seqs, ended, n, shape):
    """(B, L) True at the target positions of a looped rollout's last n tokens, in pack's layout."""
    mask = torch.zeros(shape, dtype=torch.bool)
    for b, (p, s, e) in enumerate(zip(prompts, seqs, ended)):
        if looped(s, e, n):
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
    Across tokenizers (t2s, s2t: tokenizer.token_map, -1 where no token has that string): U_t in
    student ids, the teacher's top-k mapped by t2s, read at s2t[U_t]; unmapped ones don't count."""
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

def topk_union_kl(s_u, t_u, valid, tau=1.0):
    """The paper's loss per position from the two models' scores on U_t (N, 2k): forward KL with
    both renormalised on the valid entries; positions with < 2 valid entries give 0, do not count.
    Scores may be log-probabilities or logits: renormalising cancels the normaliser."""
    ok = valid.sum(1) >= 2
    s = F.log_softmax((s_u / tau).masked_fill(~valid, -math.inf), dim=-1)
    t = F.log_softmax((t_u / tau).masked_fill(~valid, -math.inf), dim=-1)
    return tau ** 2 * torch.where(ok, kl(t, s), 0.0), ok

def divergence(lp_s, lp_t, x, loss, tau=1.0, beta=0.5):
    """The other objectives per position (N,), from the student's (with grad) and the teacher's
    full masked log-probabilities (N, V); x (N,): the rollout's tokens."""
    if loss == 'pg':  # tinker: REINFORCE on log p_S(x) with the reward -(log p_S(x) - log p_T(x))
        lps_x = lp_s.gather(1, x[:, None]).squeeze(1)
        return -(lp_t.gather(1, x[:, None]).squeeze(1) - lps_x.detach()) * lps_x
    s, t = F.log_softmax(lp_s / tau, dim=-1), F.log_softmax(lp_t / tau, dim=-1)
    if loss == 'fkl' or (loss == 'jsd' and beta == 0):
        return tau ** 2 * kl(t, s)
    if loss == 'rkl' or (loss == 'jsd' and beta == 1):
        return tau ** 2 * kl(s, t)
    # jsd (GKD): M = beta p_T + (1 - beta) p_S; beta KL(T || M) + (1 - beta) KL(S || M)
    fin = t.isfinite()  # masked ids: -inf on both sides (logsumexp of two -inf: nan gradient)
    m = torch.logsumexp(torch.stack([s.masked_fill(~fin, 0) + math.log(1 - beta),
                                     t.masked_fill(~fin, 0) + math.log(beta)]), 0)
    return tau ** 2 * (beta * kl(t, m) + (1 - beta) * kl(s, m))

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

def now(device):
    if device.type == 'cuda':
        torch.cuda.synchronize()
    return time.perf_counter()

def opd_step(S, T, rescore, max_lens, hp, maps=None, generator=None, full_diag=False):
    """Steps 1-4 of one OPD batch on this rank, for both student families. S, T: the student's
    and the teacher's Side; max_lens: each rollout's bound; hp: Step. maps: None where both read
    the same tokens (a smaller Whisper), else (teacher -> student, student -> teacher) ids by
    token string (tokenizer.token_map). -> (summed per-position loss with grad, positions that
    count, stats)."""
    dev, k, B = S.xa.device, min(hp.topk, S.model.dims.n_vocab), len(S.prompts)
    union_only = hp.loss == 'topk_union'
    t0 = now(dev)
    # 1. rollout: the student's own transcripts, and its top-k ids at every step
    seqs, ended, top_s = rollout(S.model, S.tok, S.xa, S.prompts, max_lens, hp,
                                 k if union_only else 0, generator, S.xa_mask)
    t_seqs = s_seqs = seqs
    cut = [False] * B
    if maps is not None:  # another tokenizer: the teacher reads the rollout as text
        t_seqs, s_seqs, cut = retokenize(seqs, S.tok, T.tok, maps[0])
    kept_ended = [e and not c for e, c in zip(ended, cut)]
    tokens_t, targets_t = (t.to(dev) for t in pack(T.prompts, t_seqs, kept_ended, T.tok.eot))
    tokens_s, targets_s = (t.to(dev) for t in pack(S.prompts, s_seqs, kept_ended, S.tok.eot))
    mask_t, mask_s = targets_t != -100, targets_s != -100  # every token, and EOT where it ended
    x = targets_s[mask_s]
    t1 = now(dev)
    # 2. teacher scores: one teacher-forced pass, log-probs over its masked vocabulary (N, V_T)
    with torch.no_grad(), common.autocast(dev.type, hp.dtype, hp.cpu_bf16):
        lp_t = T.model.decoder(tokens_t, T.xa, xa_mask=T.xa_mask)[mask_t]
        lp_t = masked_log_softmax(lp_t, T.tok.suppress)
    t2 = now(dev)
    if union_only:
        ids_s = top_s if maps is None else retokenized_topk(S, tokens_s, mask_s, top_s, seqs,
                                                             s_seqs, kept_ended, k, hp)
        union, valid, dup = union_support(torch.cat(ids_s).to(dev), lp_t, k, *(maps or ()))
        # 3. student re-scores the same tokens, with gradients: only the logits of U_t's 2k ids.
        # Renormalising on U_t cancels log Z, so this is the loss on full log-probabilities
        # (tests/test_distill.py checks the loss and the gradients)
        with common.autocast(dev.type, hp.dtype, hp.cpu_bf16):
            s_u = rescore(tokens_s, S.xa, select=mask_s, ids=union, xa_mask=S.xa_mask)
        # 4. union top-k forward KL per position
        t_u = lp_t.gather(1, union if maps is None else maps[1][union].clamp(min=0))
        per_pos, ok = topk_union_kl(s_u, t_u, valid, hp.tau)
        if maps is not None:  # a position whose teacher top-k keeps < 2 student ids: dropped
            mapped = (dup | valid[:, k:]).sum(1)
            per_pos, ok = torch.where(mapped >= 2, per_pos, 0.0), ok & (mapped >= 2)
    else:
        # 3. student re-scores, with gradients: log-probs over its full masked vocabulary (N, V)
        with common.autocast(dev.type, hp.dtype, hp.cpu_bf16):
            lp_s = rescore(tokens_s, S.xa, xa_mask=S.xa_mask)[mask_s]
            lp_s = masked_log_softmax(lp_s, S.tok.suppress)
        # 4. the chosen divergence per position
        per_pos = divergence(lp_s, lp_t, x, hp.loss, hp.tau, hp.beta)
        ok = torch.ones_like(x, dtype=torch.bool)
        _, valid, dup = union_support(lp_s.detach().topk(k, dim=-1).indices, lp_t, k)  # VUSS
    # anti-loop (off unless loop_unlikelihood > 0): where the rollout repeated an n-gram, the
    # teacher forced onto the loop tends to continue it: those tokens get -log(1 - p_S) instead
    loop = loop_tails(S.prompts, s_seqs, kept_ended, hp.ngram_stop, targets_s.shape)
    loop = loop[mask_s.cpu()].to(dev)
    if hp.loop_unlikelihood > 0 and loop.any():
        if union_only:
            ul, inside = union_unlikelihood(s_u, union, valid, x)
            loop = loop & inside
        else:
            ul = unlikelihood(lp_s.gather(1, x[:, None]).squeeze(1))
        per_pos, ok = torch.where(loop, hp.loop_unlikelihood * ul, per_pos), ok | loop
    # diagnostics: VUSS (valid tokens in U_t) and overlap |S top-k & T top-k| / k; across
    # tokenizers the rollouts segmented otherwise, those cut, the teacher's top-k ids unmapped
    stats = dict(vuss=valid.sum().item(), overlap=dup.float().mean(1).sum().item(),
                 positions=len(x), rollout_len=sum(map(len, seqs)), ended=sum(ended),
                 rollouts=B, looped=sum(looped(s, e, hp.ngram_stop) for s, e in zip(seqs, ended)),
                 t_rollout=t1 - t0, t_teacher=t2 - t1)
    if maps is not None:
        stats.update(mismatch=sum(s != q for s, q in zip(s_seqs, seqs)), truncated=sum(cut),
                     unmapped=(k * len(x) - mapped.sum()).item(), topk_ids=k * len(x))
    if full_diag:  # the full-vocabulary KLs, over the student's vocabulary
        with torch.no_grad():
            lp_s = S.model.decoder(tokens_s, S.xa, xa_mask=S.xa_mask)[mask_s]
            lp_s = masked_log_softmax(lp_s, S.tok.suppress)
            if maps is not None:
                lp_t = lp_t[:, maps[1].clamp(min=0)].masked_fill(maps[1] < 0, -math.inf)
            stats.update(full_kls(lp_s, lp_t))
    return per_pos.sum(), ok.sum(), stats

# -----------------------------------------------------------------------------

def check(c):
    """Settings no run can use: one line, before anything loads."""
    if c['loss'] not in LOSSES:
        common.fail(f"loss={c['loss']!r}: expected one of {', '.join(LOSSES)}")
    for k in ('batch_size', 'eval_batch_size', 'log_interval', 'topk', 'max_new_tokens'):
        if c[k] <= 0:
            common.fail(f"{k}={c[k]}: must be positive")
    if c['max_iters'] < 0 or c['learning_rate'] <= 0 or c['tau'] <= 0 or c['temperature'] < 0:
        common.fail(', '.join(f"{k}={c[k]}" for k in ('max_iters', 'learning_rate', 'tau',
                                                      'temperature')) +
                    ": need max_iters >= 0, learning_rate > 0, tau > 0, temperature >= 0")

def load_pair(teacher_path, path, loss, dev):
    """The frozen teacher and the student (dropout off, encoder frozen: OPD trains the rest) ->
    (teacher, its tokenizer, student, its tokenizer, the student's checkpoint, frozen names,
    maps). maps: None where the student reads the teacher's tokens under the teacher's prompt,
    else the two id maps by token string (the audio-LLM: OPD through text)."""
    teacher, tok, _ = load_checkpoint(teacher_path, dev)
    teacher.requires_grad_(False)
    student, s_tok, ckpt = load_checkpoint(path)
    maps = None
    if isinstance(student, AudioLLM) or s_tok.to_dict() != tok.to_dict():
        if loss != 'topk_union':
            common.fail(f"{path}: a student with its own tokenizer takes loss='topk_union'")
        maps = (token_map(tok, s_tok).to(dev), token_map(s_tok, tok).to(dev))
    elif student.dims.n_vocab != teacher.dims.n_vocab:
        common.fail(f"student vocab {student.dims.n_vocab} != teacher vocab "
                    f"{teacher.dims.n_vocab}")
    student = common.with_dropout(student, 0.0)  # rollouts and updates alike without dropout
    frozen = common.freeze(student, (ckpt or {}).get('frozen', []) + [
        n for n, _ in student.named_parameters() if n.startswith(('encoder.', 'ctc_head.'))])
    return teacher, tok, student.to(dev).train(), s_tok, ckpt, frozen, maps

def encoder_caches(teacher, student, n_frames, directory, ctx):
    """-> (whether the two encoders are one, the teacher's and the student's EncoderCache): a
    frozen encoder's outputs are kept per clip where every mel has the same length (else None)."""
    shared = common.same_encoder(student, teacher)
    cache = lambda m: common.EncoderCache(m.encoder, directory, ctx) if n_frames else None
    cache_t = cache(teacher)
    return shared, cache_t, cache_t if shared else cache(student)

def prompts_of(model, tok, rows, batch):
    """Each clip's prompt: the audio-LLM's holds its audio tokens; Whisper's, its language."""
    if isinstance(model, AudioLLM):
        return [tok.prompt(n) for n in batch['mel_lengths'].tolist()]
    return [tok.sot_sequence(rows[i].get('lang')) for i in batch['index']]

def log_record(s, steps, across):
    """One log line from the stats summed over ranks and steps; across: OPD through text."""
    pos, ro, kl_pos = (max(s[k], 1) for k in ('positions', 'rollouts', 'kl_positions'))
    record = {'loss': s['loss'] / steps, 'kl_st': s['kl_st'] / kl_pos,
              'kl_ts': s['kl_ts'] / kl_pos, 'vuss': s['vuss'] / pos,
              'overlap': s['overlap'] / pos, 'rollout_len': s['rollout_len'] / ro,
              'eot_frac': s['ended'] / ro, 'loop_frac': s['looped'] / ro,
              'ms_rollout': 1000 * s['t_rollout'] / steps,
              'ms_teacher': 1000 * s['t_teacher'] / steps, 'ms_step': 1000 * s['t_step'] / steps}
    if across:  # rollouts the teacher segments otherwise, teacher ids with no student id, cuts
        record.update(retokenize_mismatch_ratio=s['mismatch'] / ro,
                      unmapped_share=s['unmapped'] / max(s['topk_ids'], 1),
                      truncated_rollouts=s['truncated'])
    return record

def main():
    check(globals())
    config = {k: globals()[k] for k in config_keys}
    ddp, rank, local_rank, world_size, dev = common.init_ddp(device)
    master, device_type = rank == 0, 'cuda' if dev.startswith('cuda') else 'cpu'
    hp = Step(**dict({f.name: globals()[f.name] for f in fields(Step)},
                     cpu_bf16=common.cpu_bf16_ok(cpu_bf16, device_type)))
    torch.manual_seed(seed)
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    os.makedirs(out_dir, exist_ok=True)

    # teacher (frozen, on every rank, never wrapped in DDP) and student
    path = ckpt_path if init_from == 'resume' else init_from
    if not os.path.exists(path):
        common.fail(f"init_from={init_from!r}: {path} does not exist")
    teacher, tok, student, student_tok, checkpoint, frozen, maps = load_pair(teacher_path, path,
                                                                             loss, dev)
    if init_from == 'resume' and checkpoint['config']['teacher_path'] != teacher_path:
        common.fail(f"{path} was distilled from {checkpoint['config']['teacher_path']}, "
                    f"not {teacher_path}")
    audio_llm = isinstance(student, AudioLLM)
    n_frames = evaluate.whisper_frames(student, tok)  # 3000 for Whisper weights, else None
    shared, cache_t, cache_s = encoder_caches(teacher, student, n_frames, encoder_cache_dir,
                                              common.autocast(device_type, dtype, hp.cpu_bf16))

    # data: the audio only
    rows = data.check_audio(data.read_manifest(train_manifest))  # every clip's header, now
    train_rows = [dict(r, text=None) for r in rows if common.fits(r, student, student_tok,
                                                                  max_new_tokens)]
    if master and len(train_rows) < len(rows):
        print(f"skipping {len(rows) - len(train_rows)} utterances too long for the student")
    if not train_rows:
        common.fail(f"no usable training utterances in {train_manifest}")
    val_rows = data.check_audio(data.read_manifest(val_manifest)[:val_max_utts]
                                if val_manifest else [])
    batches = data.Batches(train_rows, tok, batch_size=batch_size, seed=seed, rank=rank,
                           world_size=world_size, n_mels=student.dims.n_mels, n_frames=n_frames)

    # optimizer (fp32 master weights), and where a resumed run left off
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = common.adamw(student, learning_rate, weight_decay, (0.9, beta2), device_type)
    iter_num, best_val_wer, position = 0, float('inf'), None
    generator = torch.Generator(device=dev).manual_seed(seed + rank)  # sampled rollouts
    if init_from == 'resume':
        iter_num, best_val_wer, position = common.resume(checkpoint, optimizer, out_dir, master)
        gens = checkpoint['rng']['generator']
        generator.set_state(gens[rank % len(gens)])
    loader = common.Loader(batches, position)
    rescore = Rescore(student)
    if compile:
        rescore = torch.compile(rescore, dynamic=True)
    if ddp:
        rescore = DDP(rescore, device_ids=[local_rank] if device_type == 'cuda' else None)
    if master:
        print(f"opd ({loss}): student {student.get_num_params() / 1e6:.1f}M params "
              f"({sum(p.numel() for p in params) / 1e6:.1f}M trained), teacher "
              f"{teacher.get_num_params() / 1e6:.1f}M, {'shared ' * shared}frozen encoder, "
              f"{'through text, ' * (maps is not None)}{len(train_rows)} utterances, "
              f"{world_size} process(es)")
    sums, t_start, saved = dict.fromkeys(STATS, 0.0), time.time(), False
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
                common.log_json(out_dir, {'iter': iter_num, 'val_wer': wer,
                                          'minutes': (time.time() - t_start) / 60})
            improved = [wer is not None and wer < best_val_wer]
            if ddp:
                dist.broadcast_object_list(improved, src=0)  # every rank takes part in the save
            best_val_wer = min(best_val_wer, wer if wer is not None else best_val_wer)
            if improved[0] or always_save_checkpoint or (last and not saved):
                gens = [None] * world_size if ddp else [generator.get_state()]
                if ddp:
                    dist.all_gather_object(gens, generator.get_state())
                if master:
                    common.save_checkpoint(
                        ckpt_path, student, optimizer, student_tok, iter_num=iter_num,
                        best_val_wer=best_val_wer, config=config, frozen=frozen,
                        loader=dict(loader.state),
                        rng={'generator': gens, 'torch': torch.get_rng_state()})
                saved = True
        if last:
            break
        lr = common.get_lr(iter_num, learning_rate, warmup_iters, lr_decay_iters or max_iters,
                           min_lr) if decay_lr else learning_rate
        for group in optimizer.param_groups:
            group['lr'] = lr * group['lr_scale']
        t0 = now(torch.device(dev))
        batch = loader.next()
        mel, paths = batch['mel'].to(dev), batch['audio']
        # mels padded to the longest in the batch: the padding is masked (Whisper's 30-s window
        # is not: the model was trained reading it); the audio-LLM's adapter reads real frames
        real = length_mask(batch['mel_lengths'].to(dev), mel.shape[2])
        frames = None if n_frames else real
        with torch.no_grad():
            xa_t = cache_t(mel, paths) if cache_t else teacher.encoder(mel, frames)
            xa_s = xa_t if shared else cache_s(mel, paths) if cache_s else \
                student.encoder(mel, frames)
        S = Side(student, student_tok, xa_s, student.encoder.frames_mask(real if audio_llm else
                 frames), prompts_of(student, student_tok, train_rows, batch))
        T = Side(teacher, tok, xa_t, teacher.encoder.frames_mask(frames),
                 prompts_of(teacher, tok, train_rows, batch))
        # steps 1-4: rollout, teacher scores, student re-scores, per-position divergence (with
        # the full-vocabulary KLs on the last step before each log line)
        full_diag = (iter_num + 1) % log_interval == 0 or iter_num + 1 == max_iters
        max_lens = length_bounds(batch['duration'].tolist(), tokens_per_second)
        loss_sum, n, stats = opd_step(S, T, rescore, max_lens, hp, maps, generator, full_diag)
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
            common.fail(f"iter {iter_num}: non-finite loss ({value.item()}); stopping without a "
                        f"checkpoint (lower learning_rate, check the data, or dtype='float32')")
        common.update(optimizer, params, grad_clip)
        iter_num += 1
        stats.update(loss=value.item(), t_step=now(torch.device(dev)) - t0)
        for k in STATS:
            sums[k] += stats.get(k, 0.0)
        # log: sums over the ranks and the steps since the last line
        if iter_num % log_interval == 0 or iter_num == max_iters:
            tot = torch.tensor([sums[k] for k in STATS], dtype=torch.float64, device=dev)
            if ddp:
                dist.all_reduce(tot)
            s, steps = dict(zip(STATS, tot.tolist())), world_size * (iter_num - last_logged)
            record = {'iter': iter_num, 'lr': lr, **log_record(s, steps, maps is not None),
                      'minutes': (time.time() - t_start) / 60}
            if master:
                print(f"iter {iter_num}: " + ', '.join(f"{k} {v:.4g}" for k, v in record.items()
                                                       if k != 'iter'))
                common.log_json(out_dir, record)
            sums, last_logged = dict.fromkeys(STATS, 0.0), iter_num
    if ddp:
        del rescore
        common.end_ddp()

if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    common.one_line_errors()
    main()
