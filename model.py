"""
A Whisper-architecture encoder-decoder, written out by hand in one file.
Parameter names equal openai-whisper's state-dict keys, so real Whisper weights load without renaming
(teacher.py reads .pt, Hugging Face and CTranslate2 checkpoints). The same class is the teacher and the student:
the student is just a smaller ModelDimensions.
Decoding: batched greedy / sampling (`generate`) and batched beam search (`beam_search`), both with a KV cache:
self-attention keys/values grow by one token per step, cross-attention keys/values are computed once per utterance.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class ModelDimensions:
    # openai-whisper's ten fields, same names, same meaning (export writes exactly these)
    n_mels: int = 80
    n_audio_ctx: int = 1500     # max encoder frames after the conv stem (30 s for Whisper)
    n_audio_state: int = 512
    n_audio_head: int = 8
    n_audio_layer: int = 6
    n_vocab: int = 51865
    n_text_ctx: int = 448
    n_text_state: int = 512
    n_text_head: int = 8
    n_text_layer: int = 6
    # nanoOPD extras for models trained from scratch (Whisper weights use the defaults)
    conv_stride: int = 2        # stride of the second conv: 4 halves the encoder's frame rate again
    ctc: bool = False           # add a CTC head on the encoder output (blank = n_vocab)
    dropout: float = 0.0

WHISPER_FIELDS = ('n_mels', 'n_audio_ctx', 'n_audio_state', 'n_audio_head', 'n_audio_layer',
                  'n_vocab', 'n_text_ctx', 'n_text_state', 'n_text_head', 'n_text_layer')

def sinusoids(length, channels, max_timescale=10000):
    """Whisper's sinusoidal positions for the encoder."""
    assert channels % 2 == 0
    log_timescale_increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2))
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)

class MultiHeadAttention(nn.Module):

    def __init__(self, n_state, n_head, dropout=0.0):
        super().__init__()
        self.n_head = n_head
        self.dropout = dropout
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # Whisper's key has no bias
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def split(self, x):
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hs)

    def kv(self, src):
        return self.split(self.key(src)), self.split(self.value(src))

    def forward(self, x, xa=None, causal=False, kv_cache=None):
        q = self.split(self.query(x))
        if xa is not None and kv_cache is not None and self in kv_cache:
            k, v = kv_cache[self]  # cross-attention: the audio's keys/values were computed once
        else:
            k, v = self.kv(x if xa is None else xa)
            if kv_cache is not None:
                if xa is None and self in kv_cache:  # self-attention: append the new positions
                    k = torch.cat([kv_cache[self][0], k], dim=2)
                    v = torch.cat([kv_cache[self][1], v], dim=2)
                kv_cache[self] = (k, v)
        mask = None
        if causal and q.shape[2] > 1:
            if k.shape[2] == q.shape[2]:
                mask = 'causal'
            else:  # several new tokens after a cached prefix: each sees the prefix and the new tokens up to itself
                T_new, T_all = q.shape[2], k.shape[2]
                mask = torch.ones(T_new, T_all, dtype=torch.bool, device=x.device).tril(T_all - T_new)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if mask == 'causal' else mask, is_causal=mask == 'causal',
            dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).flatten(2))

class ResidualAttentionBlock(nn.Module):

    def __init__(self, n_state, n_head, cross_attention=False, dropout=0.0):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head, dropout)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head, dropout) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(), nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, xa=None, causal=False, kv_cache=None):
        x = x + self.drop(self.attn(self.attn_ln(x), causal=causal, kv_cache=kv_cache))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.cross_attn_ln(x), xa, kv_cache=kv_cache))
        x = x + self.drop(self.mlp(self.mlp_ln(x)))
        return x

class AudioEncoder(nn.Module):

    def __init__(self, n_mels, n_ctx, n_state, n_head, n_layer, conv_stride=2, dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=conv_stride, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head, dropout=dropout) for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, mel):
        """mel: (B, n_mels, T) -> (B, ceil(T / conv_stride), n_state); any T up to the context."""
        x = F.gelu(self.conv1(mel))
        x = F.gelu(self.conv2(x)).transpose(1, 2)
        assert x.shape[1] <= self.positional_embedding.shape[0], f"audio too long: {x.shape[1]} frames > n_audio_ctx"
        x = x + self.positional_embedding[:x.shape[1]].to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)

class TextDecoder(nn.Module):

    def __init__(self, n_vocab, n_ctx, n_state, n_head, n_layer, dropout=0.0):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head, cross_attention=True, dropout=dropout)
                                     for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_state)

    def forward(self, tokens, xa, kv_cache=None, project=True):
        """tokens: (B, L) -> logits (B, L, n_vocab), or the final hidden states (B, L, n_state) when project is False.
        project may also be a (n_vocab, n_state) copy of the token embedding to use, e.g. in bf16 for faster decoding.
        With a kv_cache, tokens are the new positions only."""
        offset = 0
        if kv_cache and self.blocks[0].attn in kv_cache:
            offset = kv_cache[self.blocks[0].attn][0].shape[2]
        x = self.token_embedding(tokens) + self.positional_embedding[offset:offset + tokens.shape[1]]
        x = x.to(xa.dtype)
        for block in self.blocks:
            x = block(x, xa, causal=True, kv_cache=kv_cache)
        x = self.ln(x)
        if project is False:
            return x
        w = self.token_embedding.weight if project is True else project  # tied output embedding
        return (x.to(w.dtype) @ w.T).float()

    def cross_kv(self, xa):
        """Every block's cross-attention keys and values over the audio xa: a kv_cache to start decoding from."""
        return {b.cross_attn: b.cross_attn.kv(xa) for b in self.blocks}

class Whisper(nn.Module):

    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = dims
        self.encoder = AudioEncoder(dims.n_mels, dims.n_audio_ctx, dims.n_audio_state, dims.n_audio_head,
                                    dims.n_audio_layer, dims.conv_stride, dims.dropout)
        self.decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                   dims.n_text_layer, dims.dropout)
        self.ctc_head = nn.Linear(dims.n_audio_state, dims.n_vocab + 1) if dims.ctc else None
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            nn.init.normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
        elif isinstance(module, TextDecoder):
            nn.init.normal_(module.positional_embedding, std=0.01)

    def forward(self, mel, tokens):
        return self.decoder(tokens, self.encoder(mel))

    def get_num_params(self, part=None):
        module = self if part is None else getattr(self, part)
        return sum(p.numel() for p in module.parameters())

    def estimate_flops(self, n_frames, n_tokens):
        """Training FLOPs (forward + backward) for one utterance of n_frames mel frames and n_tokens tokens,
        PaLM-style: 6 * params * positions for the matmuls plus the attention scores."""
        d = self.dims
        T_a = math.ceil(n_frames / d.conv_stride)
        enc = 6 * self.get_num_params('encoder') * T_a + 12 * d.n_audio_layer * d.n_audio_state * T_a * T_a
        dec_params = self.get_num_params('decoder') - self.decoder.positional_embedding.numel()
        dec = 6 * dec_params * n_tokens + 12 * d.n_text_layer * d.n_text_state * n_tokens * (n_tokens + T_a)
        return enc + dec

    @classmethod
    def from_pretrained(cls, path):
        """Load real Whisper weights (openai .pt, Hugging Face dir or CTranslate2 dir): returns (model, tokenizer)."""
        from teacher import load_whisper
        return load_whisper(path)

    # ------------------------------------------------------------------------------------------------
    # decoding

    def _mask(self, logits, step, suppress, suppress_blank):
        logits = logits.float()
        if len(suppress):
            logits[:, list(suppress)] = -math.inf
        if step == 0 and len(suppress_blank):  # Whisper's SuppressBlank: no blank or EOT as the first token
            logits[:, list(suppress_blank)] = -math.inf
        return logits

    @torch.no_grad()
    def generate(self, xa, prompt, eot, max_new_tokens=None, suppress=(), suppress_blank=(), temperature=0.0,
                 top_p=1.0, max_lens=None, generator=None, stop_ngram=0, topk=0, kv_cache=None, project=True):
        """Batched greedy decoding (temperature 0) or sampling, KV-cached.
        xa: encoder output (B, S, D); prompt: list[int] shared by the batch; max_lens: optional per-utterance bound;
        stop_ngram > 0: stop a sequence where an n-gram of that size occurs the second time (a loop), keeping it.
        Returns (tokens, logprobs, ended): lists over the batch, without prompt and EOT; ended[b] says EOT was reached.
        topk > 0: also the top-k ids of every step's masked logits, (len(tokens[b]) + ended[b], topk) per utterance.
        kv_cache: optionally the cross-attention keys/values already computed (TextDecoder.cross_kv); project: the
        output embedding to use (TextDecoder.forward)."""
        B, device = xa.shape[0], xa.device
        limit = self.dims.n_text_ctx - len(prompt)
        max_new_tokens = limit if max_new_tokens is None else min(max_new_tokens, limit)
        bounds = [max_new_tokens] * B if max_lens is None else [min(int(m), max_new_tokens) for m in max_lens]
        seen = [set() for _ in range(B)]  # stop_ngram: the n-grams each sequence has produced
        kv_cache = dict(kv_cache or {})
        logits = self.decoder(torch.tensor([prompt] * B, device=device), xa, kv_cache, project)[:, -1]
        tokens = torch.zeros(B, 0, dtype=torch.long, device=device)
        logprobs = torch.zeros(B, 0, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        ended = torch.zeros(B, dtype=torch.bool, device=device)
        top_ids = []
        for step in range(max_new_tokens):
            logits = self._mask(logits, step, suppress, suppress_blank)
            logp = F.log_softmax(logits, dim=-1)
            if topk:
                top_ids.append(logits.topk(topk, dim=-1).indices)
            if temperature == 0:
                next_token = logits.argmax(dim=-1)
            else:
                probs = F.softmax(logits / temperature, dim=-1)
                if top_p < 1.0:  # nucleus: keep the smallest set of tokens whose mass reaches top_p
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
                    if gram in seen[b]:
                        bounds[b] = step + 1
                    seen[b].add(gram)
            done |= torch.as_tensor(bounds, device=device) <= step + 1
            if done.all():
                break
            logits = self.decoder(next_token[:, None], xa, kv_cache, project)[:, -1]
        out_tokens, out_logprobs = [], []
        for b in range(B):
            t = tokens[b].tolist()
            n = min(t.index(eot) if eot in t else len(t), bounds[b])
            out_tokens.append(t[:n])
            out_logprobs.append(logprobs[b, :n].tolist())
        if topk:
            top_ids = torch.stack(top_ids, dim=1)  # (B, steps, topk)
            return out_tokens, out_logprobs, ended.tolist(), [top_ids[b, :len(t) + e] for b, (t, e) in
                                                              enumerate(zip(out_tokens, ended.tolist()))]
        return out_tokens, out_logprobs, ended.tolist()

    @torch.no_grad()
    def beam_search(self, xa, prompt, eot, beam_size=5, max_new_tokens=None, length_penalty=None,
                    suppress=(), suppress_blank=()):
        """Batched beam search, ranked like openai-whisper: sum logprob / length (length_penalty None)
        or / ((5 + length) / 6) ** length_penalty. Returns (tokens, logprobs, ended) like generate;
        logprobs holds one number per utterance, the summed log-probability of the chosen hypothesis."""
        B, K, device = xa.shape[0], beam_size, xa.device
        limit = self.dims.n_text_ctx - len(prompt)
        max_new_tokens = limit if max_new_tokens is None else min(max_new_tokens, limit)
        xa = xa.repeat_interleave(K, dim=0)
        kv_cache = {}
        logits = self.decoder(torch.tensor([prompt] * (B * K), device=device), xa, kv_cache)[:, -1]
        seqs = [[] for _ in range(B * K)]
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = -math.inf  # all beams start identical: keep only the first alive at step 0
        finished = [[] for _ in range(B)]  # (sum_logprob, tokens)
        self_attn = [block.attn for block in self.decoder.blocks]
        for step in range(max_new_tokens):
            logp = F.log_softmax(self._mask(logits, step, suppress, suppress_blank), dim=-1)
            cand = (scores.view(-1, 1) + logp).view(B, -1)  # (B, K * V)
            top_scores, top_idx = cand.topk(2 * K, dim=-1)
            top_scores, top_idx = top_scores.tolist(), top_idx.tolist()
            V = logp.shape[-1]
            source, next_tokens, new_scores = [], [], []
            for b in range(B):
                live = []
                for s, i in zip(top_scores[b], top_idx[b]):
                    src, tok = b * K + i // V, i % V
                    if s == -math.inf:
                        break
                    if tok == eot:
                        if len(finished[b]) < K:
                            finished[b].append((s, seqs[src]))
                    elif len(live) < K:
                        live.append((src, tok, s))
                    if len(live) == K:
                        break
                while len(live) < K:  # pad with dead beams (a finished utterance, or too few candidates)
                    live.append((b * K, eot, -math.inf))
                for src, tok, s in live:
                    source.append(src); next_tokens.append(tok); new_scores.append(s)
            if all(len(f) >= K for f in finished):
                break
            seqs = [seqs[src] + [tok] for src, tok in zip(source, next_tokens)]
            scores = torch.tensor(new_scores, device=device).view(B, K)
            index = torch.tensor(source, device=device)
            for m in self_attn:  # reorder the growing self-attention cache; cross-attention K/V are per utterance
                kv_cache[m] = (kv_cache[m][0][index], kv_cache[m][1][index])
            logits = self.decoder(torch.tensor(next_tokens, device=device)[:, None], xa, kv_cache)[:, -1]
        out_tokens, out_scores, ended = [], [], []
        for b in range(B):
            live = [(scores[b, k].item(), seqs[b * K + k]) for k in range(K) if scores[b, k] > -math.inf]
            cands = finished[b] + sorted(live, reverse=True)[:K - len(finished[b])]  # too few finished: add live beams
            def rank(c):
                n = max(len(c[1]), 1)
                return c[0] / (n if length_penalty is None else ((5 + n) / 6) ** length_penalty)
            best = max(cands, key=rank)
            out_tokens.append(best[1]); out_scores.append([best[0]]); ended.append(bool(finished[b]))
        return out_tokens, out_scores, ended
