"""
Decoding, apart from the models as in openai-whisper's decoding.py: generate (greedy or sampled,
batched, both student families) and beam_search (Whisper's), both through a decoder's KV cache.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from model import AudioLLM

class Decoding(NamedTuple):
    """What generate and beam_search return, one entry per utterance (prompt and EOT left out)."""
    tokens: list                    # the decoded token ids
    logprobs: list                  # generate: one per token; beam_search: [sum of the hypothesis]
    ended: list                     # whether EOT was reached
    top_ids: Optional[list] = None  # generate(topk=k): (len(tokens[b]) + ended[b], k) top-k ids

def mask_logits(logits, step, suppress, suppress_blank):
    """Float logits, suppress at -inf; at step 0 suppress_blank too (Whisper's SuppressBlank)."""
    masked = list(suppress) + (list(suppress_blank) if step == 0 else [])
    logits = logits.float()
    if masked:
        logits[:, masked] = -math.inf
    return logits

@torch.no_grad()
def decode(next_logits, x, eot, n_ctx, max_new_tokens=None, suppress=(), suppress_blank=(),
           temperature=0.0, top_p=1.0, max_lens=None, generator=None, stop_ngram=0, topk=0,
           kv_cache=None):
    """Batched greedy decoding (temperature 0) or sampling -> Decoding. next_logits(x, kv_cache):
    a decoder's logits (B, V) after the new tokens x: the prompts (B, P), then one token a step.
    n_ctx: the decoder's positions; max_lens: per-utterance bounds; stop_ngram > 0: stop where an
    n-gram of that size occurs twice (a loop); topk > 0: also the top-k ids of each step's masked
    logits; kv_cache: one to start from (TextDecoder.cross_kv, say), copied, not written to."""
    (B, P), device, kv_cache = x.shape, x.device, dict(kv_cache or {})
    if P > n_ctx:
        raise ValueError(f"a prompt of {P} tokens, more than the decoder's n_text_ctx of {n_ctx}")
    max_new_tokens = n_ctx - P if max_new_tokens is None else min(max_new_tokens, n_ctx - P)
    bounds = [min(int(m), max_new_tokens) for m in max_lens or [max_new_tokens] * B]
    seen = [set() for _ in range(B)]  # stop_ngram: the n-grams each sequence has produced
    tokens = torch.zeros(B, 0, dtype=torch.long, device=device)
    logprobs = torch.zeros(B, 0, device=device)
    done, ended = torch.zeros(2, B, dtype=torch.bool, device=device)
    top_ids = []
    for step in range(max_new_tokens):
        logits = mask_logits(next_logits(x, kv_cache), step, suppress, suppress_blank)
        logp = F.log_softmax(logits, dim=-1)
        if topk:
            top_ids.append(logits.topk(topk, dim=-1).indices)
        if temperature == 0:
            next_token = logits.argmax(dim=-1)
        else:
            probs = F.softmax(logits / temperature, dim=-1)
            if top_p < 1.0:  # nucleus: the smallest set of tokens whose mass reaches top_p
                sorted_p, idx = probs.sort(dim=-1, descending=True)
                drop = sorted_p.cumsum(-1) - sorted_p > top_p
                probs = probs.scatter(-1, idx, sorted_p.masked_fill(drop, 0.0))
            next_token = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        next_token = torch.where(done, torch.full_like(next_token, eot), next_token)
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        logprobs = torch.cat([logprobs, logp.gather(1, next_token[:, None])], dim=1)
        ended |= ~done & (next_token == eot)
        done |= next_token == eot
        if stop_ngram and step + 1 >= stop_ngram:
            for b in (~done).nonzero().flatten().tolist():
                gram = tuple(tokens[b, -stop_ngram:].tolist())
                bounds[b] = step + 1 if gram in seen[b] else bounds[b]
                seen[b].add(gram)
        done |= torch.as_tensor(bounds, device=device) <= step + 1
        if done.all():
            break
        x = next_token[:, None]
    tokens, logprobs, ended = tokens.tolist(), logprobs.tolist(), ended.tolist()
    n = [min(t.index(eot) if eot in t else len(t), m) for t, m in zip(tokens, bounds)]
    top = torch.stack(top_ids, dim=1) if topk else None  # (B, steps, topk)
    top_ids = [top[b, :k + e] for b, (k, e) in enumerate(zip(n, ended))] if topk else None
    return Decoding([t[:k] for t, k in zip(tokens, n)], [p[:k] for p, k in zip(logprobs, n)],
                    ended, top_ids)

def generate(model, xa, prompt, eot, *, project=True, xa_mask=None, **kw):
    """decode from the model's decoder -> Decoding. xa: encoder output (B, S, D); prompt: one list
    of ids for every clip (Whisper), or one per clip (AudioLLM: left-padded to the longest, the
    pads hidden by its pad_mask); xa_mask: the real encoder frames; project: as in TextDecoder;
    kw: decode's (kv_cache, topk, ...)."""
    if isinstance(model, AudioLLM):
        P = max(map(len, prompt))
        x = torch.tensor([[eot] * (P - len(p)) + list(p) for p in prompt], device=xa.device)
        pad = (torch.arange(P) >= torch.tensor([[P - len(p)] for p in prompt])).to(xa.device)
        step = lambda x, kv_cache: model.decoder(x, xa, kv_cache, project, xa_mask, pad)[:, -1]
    else:
        x = torch.tensor([list(prompt)] * len(xa), device=xa.device)
        step = lambda x, kv_cache: model.decoder(x, xa, kv_cache, project, xa_mask)[:, -1]
    return decode(step, x, eot, model.dims.n_text_ctx, **kw)

@torch.no_grad()
def beam_search(model, xa, prompt, eot, beam_size=5, max_new_tokens=None, length_penalty=None,
                suppress=(), suppress_blank=(), xa_mask=None):
    """Batched beam search ranked like openai-whisper, by sum logprob / length (length_penalty
    None) or / ((5 + length) / 6) ** length_penalty -> Decoding; logprobs[b] is [the sum]."""
    B, K, device = xa.shape[0], beam_size, xa.device
    limit = model.dims.n_text_ctx - len(prompt)
    max_new_tokens = limit if max_new_tokens is None else min(max_new_tokens, limit)
    xa = xa.repeat_interleave(K, dim=0)
    xa_mask = None if xa_mask is None else xa_mask.repeat_interleave(K, dim=0)
    kv_cache = {}
    step_logits = lambda x: model.decoder(x, xa, kv_cache, xa_mask=xa_mask)[:, -1]
    logits = step_logits(torch.tensor([prompt] * (B * K), device=device))
    seqs, finished = [[] for _ in range(B * K)], [[] for _ in range(B)]  # (sum_logprob, tokens)
    scores = torch.zeros(B, K, device=device)
    scores[:, 1:] = -math.inf  # all beams start identical: only the first is alive at step 0
    for step in range(max_new_tokens):
        logp = F.log_softmax(mask_logits(logits, step, suppress, suppress_blank), dim=-1)
        V = logp.shape[-1]
        top = (scores.view(-1, 1) + logp).view(B, -1).topk(2 * K, dim=-1)  # over (K * V)
        live = []  # per utterance K (source beam, token, score), padded with dead beams
        for b, (top_s, top_i) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            alive = []
            for s, i in zip(top_s, top_i):
                if s == -math.inf or len(alive) == K:
                    break
                src, tok = b * K + i // V, i % V
                if tok != eot:
                    alive.append((src, tok, s))
                elif len(finished[b]) < K:
                    finished[b].append((s, seqs[src]))
            live += alive + [(b * K, eot, -math.inf)] * (K - len(alive))
        if all(len(f) >= K for f in finished):
            break
        source, next_tokens, new_scores = zip(*live)
        seqs = [seqs[src] + [tok] for src, tok in zip(source, next_tokens)]
        scores = torch.tensor(new_scores, device=device).view(B, K)
        index = torch.tensor(source, device=device)
        for m in (block.attn for block in model.decoder.blocks):  # cross-attention K/V stay
            kv_cache[m] = (kv_cache[m][0][index], kv_cache[m][1][index])
        logits = step_logits(torch.tensor(next_tokens, device=device)[:, None])
    def rank(c):  # c: (sum_logprob, tokens)
        n = max(len(c[1]), 1)
        return c[0] / (n if length_penalty is None else ((5 + n) / 6) ** length_penalty)
    best = []
    for b, f in enumerate(finished):  # too few finished: the best live beams stand in
        live = [(s, seqs[b * K + k]) for k, s in enumerate(scores[b].tolist()) if s > -math.inf]
        best.append(max(f + sorted(live, reverse=True)[:K - len(f)], key=rank))
    return Decoding([t for _, t in best], [[s] for s, _ in best], [bool(f) for f in finished])
