"""
A Whisper encoder-decoder with a KV cache. Parameter names are openai-whisper's, so real Whisper
weights load as they are (checkpoint.py); the student is the same class, smaller. The paper's
other student shape, an audio-LLM (Whisper encoder -> adapter -> causal LM), is AudioLLM, built
from the same encoder and blocks. Last, LlamaLM: a pretrained LLaMA-architecture chat LM
(SmolLM2-135M-Instruct, from a GGUF file). Decoding is apart, in decoding.py.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

@dataclass
class ModelDimensions:
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

# openai-whisper's ten fields, same names, same meaning (export writes exactly these)
WHISPER_FIELDS = ('n_mels', 'n_audio_ctx', 'n_audio_state', 'n_audio_head', 'n_audio_layer',
                  'n_vocab', 'n_text_ctx', 'n_text_state', 'n_text_head', 'n_text_layer')

def length_mask(lengths, T):
    """(B, T) True at each row's first lengths[b] frames; None when no row is padded."""
    if lengths is None or bool((lengths >= T).all()):
        return None
    return torch.arange(T, device=lengths.device)[None, :] < lengths[:, None]

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
        self.n_head, self.dropout = n_head, dropout
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # Whisper's key has no bias
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def split(self, x):
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, H, T, hs)

    def kv(self, src):
        return self.split(self.key(src)), self.split(self.value(src))

    def forward(self, x, xa=None, causal=False, kv_cache=None, mask=None):
        """mask: (B, Tk) True at the keys to attend to (the real audio frames), or None."""
        q = self.split(self.query(x))
        if xa is not None and kv_cache is not None and self in kv_cache:
            k, v = kv_cache[self]  # cross-attention: the audio's keys/values were computed once
        else:
            k, v = self.kv(x if xa is None else xa)
            if kv_cache is not None:
                if xa is None and self in kv_cache:  # self-attention: append the new positions
                    k, v = (torch.cat(pair, dim=2) for pair in zip(kv_cache[self], (k, v)))
                kv_cache[self] = (k, v)
        Tq, Tk = q.shape[2], k.shape[2]
        if mask is not None:  # (B, Tk): the same keys for every query; (B, Tq, Tk): per query
            mask = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]
        elif causal and 1 < Tq < Tk:  # new tokens after a cached prefix: each sees it and the
            mask = torch.ones(Tq, Tk, dtype=torch.bool, device=x.device).tril(Tk - Tq)  # new ones
        p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, mask, p, is_causal=causal and 1 < Tq == Tk)
        return self.out(y.transpose(1, 2).flatten(2))

class ResidualAttentionBlock(nn.Module):
    def __init__(self, n_state, n_head, cross_attention=False, dropout=0.0):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head, dropout)
        self.attn_ln = nn.LayerNorm(n_state)
        self.cross_attn = MultiHeadAttention(n_state, n_head, dropout) if cross_attention else None
        self.cross_attn_ln = nn.LayerNorm(n_state) if cross_attention else None
        self.mlp = nn.Sequential(nn.Linear(n_state, 4 * n_state), nn.GELU(),
                                 nn.Linear(4 * n_state, n_state))
        self.mlp_ln = nn.LayerNorm(n_state)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, xa=None, causal=False, kv_cache=None, mask=None):
        """mask: the audio frames to attend to (B, S): in the encoder's self-attention, or in the
        decoder's cross-attention."""
        x = x + self.drop(self.attn(self.attn_ln(x), causal=causal, kv_cache=kv_cache,
                                    mask=mask if self.cross_attn is None else None))
        if self.cross_attn is not None:
            x = x + self.drop(self.cross_attn(self.cross_attn_ln(x), xa, kv_cache=kv_cache,
                                              mask=mask))
        return x + self.drop(self.mlp(self.mlp_ln(x)))

class AudioEncoder(nn.Module):
    def __init__(self, n_mels, n_ctx, n_state, n_head, n_layer, conv_stride=2, dropout=0.0):
        super().__init__()
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=conv_stride, padding=1)
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head, dropout=dropout)
                                     for _ in range(n_layer)])
        self.ln_post = nn.LayerNorm(n_state)

    def forward(self, mel, mask=None):
        """mel: (B, n_mels, T) -> (B, ceil(T / conv_stride), n_state); any T up to the context.
        mask: (B, T) True at the real frames of mels padded to the longest in the batch (None for
        Whisper's 30-s window, whose padding the model reads). The padded frames are zeroed before
        each conv and never attended to, so each clip's output is the one it gets alone."""
        m = (lambda x: x) if mask is None else (lambda x: x * mask[:, None, :].to(x.dtype))
        x = F.gelu(self.conv1(m(mel)))
        x = F.gelu(self.conv2(m(x))).transpose(1, 2)
        assert x.shape[1] <= len(self.positional_embedding), f"audio too long: {x.shape[1]} frames"
        x = x + self.positional_embedding[:x.shape[1]].to(x.dtype)
        mask = self.frames_mask(mask)
        for block in self.blocks:
            x = block(x, mask=mask)
        return self.ln_post(x)

    def frames_mask(self, mask):
        """(B, T) mel mask -> (B, ceil(T / stride)) mask of the encoder's output frames."""
        return None if mask is None else mask[:, ::self.conv2.stride[0]]

def tied_output(x, embedding, project):
    """The tied output layer: project True for float32 logits, False for x, or a weight (bf16)."""
    if project is False:
        return x
    w = embedding.weight if project is True else project
    return (x.to(w.dtype) @ w.T).float()

class TextDecoder(nn.Module):
    def __init__(self, n_vocab, n_ctx, n_state, n_head, n_layer, dropout=0.0):
        super().__init__()
        self.token_embedding = nn.Embedding(n_vocab, n_state)
        self.positional_embedding = nn.Parameter(torch.empty(n_ctx, n_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(n_state, n_head, True, dropout)
                                     for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_state)

    def forward(self, tokens, xa, kv_cache=None, project=True, xa_mask=None):
        """tokens: (B, L) -> logits (B, L, n_vocab), with a kv_cache the new positions only.
        project: as in tied_output; xa_mask: (B, S) True at the real audio frames
        (AudioEncoder.frames_mask), or None."""
        offset = cached(kv_cache, self.blocks[0].attn)
        pos = self.positional_embedding[offset:offset + tokens.shape[1]]
        x = (self.token_embedding(tokens) + pos).to(xa.dtype)
        for block in self.blocks:
            x = block(x, xa, causal=True, kv_cache=kv_cache, mask=xa_mask)
        return tied_output(self.ln(x), self.token_embedding, project)

    def cross_kv(self, xa):
        """Every block's cross-attention keys/values over the audio: a kv_cache to decode from."""
        return {b.cross_attn: b.cross_attn.kv(xa) for b in self.blocks}

class SpeechModel(nn.Module):
    """Whisper's and AudioLLM's common part: dims, an audio encoder and a decoder reading it."""

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Conv1d, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, (nn.Linear, nn.Conv1d)) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, (TextDecoder, AudioLM)):
            nn.init.normal_(module.positional_embedding, std=0.01)

    def forward(self, mel, tokens, mask=None):
        return self.decoder(tokens, self.encoder(mel, mask), xa_mask=self.encoder.frames_mask(mask))

    def get_num_params(self, part=None):
        module = self if part is None else getattr(self, part)
        return sum(p.numel() for p in module.parameters())

    def estimate_flops(self, n_frames, n_tokens):
        """Training FLOPs (forward + backward) of one utterance, PaLM-style: 6 * params * positions
        for the matmuls plus the attention scores (the audio-LLM's LM: over its own tokens)."""
        d = self.dims
        T_a = math.ceil(n_frames / d.conv_stride)
        T_x = T_a if isinstance(self.decoder, TextDecoder) else 0  # cross-attention's keys
        enc_params = self.get_num_params('encoder')
        pe = getattr(self.decoder, 'positional_embedding', None)  # LLaMA: RoPE, none
        dec_params = self.get_num_params('decoder') - (0 if pe is None else pe.numel())
        enc = T_a * (6 * enc_params + 12 * d.n_audio_layer * d.n_audio_state * T_a)
        dec = n_tokens * (6 * dec_params + 12 * d.n_text_layer * d.n_text_state * (n_tokens + T_x))
        return enc + dec

class Whisper(SpeechModel):
    def __init__(self, dims: ModelDimensions):
        super().__init__()
        self.dims = d = dims
        self.encoder = AudioEncoder(d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head,
                                    d.n_audio_layer, d.conv_stride, d.dropout)
        self.decoder = TextDecoder(d.n_vocab, d.n_text_ctx, d.n_text_state, d.n_text_head,
                                   d.n_text_layer, d.dropout)
        self.ctc_head = nn.Linear(d.n_audio_state, d.n_vocab + 1) if d.ctc else None
        self.apply(self._init_weights)

# -----------------------------------------------------------------------------
# the audio-LLM student: Whisper encoder -> Adapter -> causal LM, prompted like a chat model

MERGE = 4  # encoder frames concatenated into one audio token

@dataclass
class AudioLLMDimensions(ModelDimensions):
    """Whisper's fields (n_text_*: the causal LM; n_text_ctx: its whole sequence, prompt, audio
    tokens and text), plus the id of <|audio|>: the adapter's outputs take its places.
    n_kv_head > 0: the LM is a pretrained LLaMA (LlamaAudioLM; n_text_*: its width, heads, blocks,
    positions), not Whisper blocks, and the last four fields are its LlamaDimensions'."""
    audio_token: int = 50259
    n_kv_head: int = 0
    n_mlp: int = 0
    rope_base: float = 100000.0
    norm_eps: float = 1e-5

def audio_tokens(mel_frames):
    """The paper's count: floor((mel_frames + 1) / 2) // 4 (the encoder halves the frames, the
    adapter merges 4): 3000 -> 375, 12.5 per second; a clip of under 4 encoder frames gets 1."""
    return max(1, (mel_frames + 1) // 2 // MERGE)

class Adapter(nn.Module):
    """Encoder frames -> LM embeddings: LayerNorm(d_enc), every 4 frames concatenated, then
    Linear(4 d_enc -> 2 d), GELU, Linear(2 d -> d). The paper replaces the encoder's ln_post by
    identity; ours reads the teacher's cached encoder output, after its ln_post, and normalises
    again here (a learned LayerNorm on a LayerNorm's output: the same family of functions)."""

    def __init__(self, n_audio_state, n_state):
        super().__init__()
        self.ln = nn.LayerNorm(n_audio_state)
        self.fc1 = nn.Linear(MERGE * n_audio_state, 2 * n_state)
        self.fc2 = nn.Linear(2 * n_state, n_state)

    def forward(self, xa, mask=None):
        """xa (B, S, d_enc), mask (B, S) True at the real frames -> (B, max(1, S // 4), d). Frames
        past a clip's end are zeroed, so a clip of f frames has f // 4 real groups (the tail that
        does not fill a group is dropped), or one zero-padded group when f < 4."""
        x = self.ln(xa)
        if mask is not None:
            x = x * mask[..., None].to(x.dtype)
        B, S, C = x.shape
        n = max(1, S // MERGE)
        x = F.pad(x, (0, 0, 0, MERGE - S)) if S < MERGE else x[:, :n * MERGE]
        return self.fc2(F.gelu(self.fc1(x.reshape(B, n, MERGE * C))))

def cached(kv_cache, attn):
    """How many positions kv_cache already holds (0 without one)."""
    return kv_cache[attn][0].shape[2] if kv_cache and attn in kv_cache else 0

def prompt_positions(tokens, offset, n_ctx, pad_mask=None):
    """The positions (B, L) of tokens after offset cached ones, and the attention mask (B, L, Tk)
    or None (plain causal); more than n_ctx positions in all is a ValueError. pad_mask (B, P):
    True at the real tokens of left-padded prompts: positions count real tokens only, and a pad
    sees itself only."""
    B, L = tokens.shape
    if offset + L > n_ctx:  # Whisper's learned positions end at 448: no extension (see README)
        raise ValueError(f"audio-LLM: {offset + L} positions, more than its n_text_ctx of "
                         f"{n_ctx} (a clip too long for the student, or too many tokens)")
    pos = torch.arange(offset, offset + L, device=tokens.device).expand(B, L)
    if pad_mask is None:
        return pos, None
    valid = F.pad(pad_mask, (0, offset + L - pad_mask.shape[1]), value=True)
    k = torch.arange(offset + L, device=tokens.device)
    q = k[offset:, None]
    return (valid.cumsum(1) - 1).clamp(min=0)[:, offset:], (valid[:, None, :] & (k <= q)) | (k == q)

def embed_audio(lm, tokens, xa, xa_mask=None):
    """lm's token embeddings, with row b's first n_b adapter outputs at its n_b <|audio|> slots."""
    x = lm.token_embedding(tokens)
    slots = tokens == lm.audio_token
    if slots.any():
        n = slots.sum(1)
        S = int(n.max()) * MERGE  # only the groups a slot reads: a short clip's 30-s window is
        audio = lm.adapter(xa[:, :S], None if xa_mask is None else xa_mask[:, :S])  # mostly pad
        if (n > audio.shape[1]).any():
            raise ValueError(f"audio-LLM: {n.max().item()} <|audio|> slots but "
                             f"{audio.shape[1]} audio tokens")
        take = torch.arange(audio.shape[1], device=tokens.device)[None, :] < n[:, None]
        x = x.masked_scatter(slots[..., None], audio[take].to(x.dtype))
    return x

class AudioLM(nn.Module):
    """The adapter and a decoder-only causal LM: Whisper's decoder blocks without cross-attention,
    learned positions, tied output embedding. Its forward takes TextDecoder's arguments (xa: the
    encoder output), so distill.Rescore and train.py drive it as they drive TextDecoder."""

    def __init__(self, d: AudioLLMDimensions):
        super().__init__()
        self.audio_token = d.audio_token
        self.adapter = Adapter(d.n_audio_state, d.n_text_state)
        self.token_embedding = nn.Embedding(d.n_vocab, d.n_text_state)
        self.positional_embedding = nn.Parameter(torch.empty(d.n_text_ctx, d.n_text_state))
        self.blocks = nn.ModuleList([ResidualAttentionBlock(d.n_text_state, d.n_text_head,
                                                            dropout=d.dropout)
                                     for _ in range(d.n_text_layer)])
        self.ln = nn.LayerNorm(d.n_text_state)

    def forward(self, tokens, xa, kv_cache=None, project=True, xa_mask=None, pad_mask=None):
        """tokens (B, L) -> logits (B, L, n_vocab), with a kv_cache the new positions only.
        Right-padded rows (teacher forcing) need no mask: causal attention keeps the padding out of
        the real positions. pad_mask (B, P): True at the real tokens of left-padded prompts (P
        first positions; decoding.generate): pads are masked, positions count the real tokens."""
        offset = cached(kv_cache, self.blocks[0].attn)
        pos, mask = prompt_positions(tokens, offset, len(self.positional_embedding), pad_mask)
        x = embed_audio(self, tokens, xa, xa_mask) + self.positional_embedding[pos]
        x = x.to(xa.dtype)
        for block in self.blocks:
            x = block(x, causal=mask is None, kv_cache=kv_cache, mask=mask)
        return tied_output(self.ln(x), self.token_embedding, project)

class AudioLLM(SpeechModel):
    """The paper's student: a Whisper encoder (frozen, the teacher's), the adapter and a causal LM
    (self.decoder), prompted <|user|><|begin_of_audio|> <|audio|> x N <|end_of_audio|> instruction
    <|assistant|> (tokenizer.ChatTokenizer.prompt), N = audio_tokens(the clip's real frames)."""

    def __init__(self, dims: AudioLLMDimensions):
        super().__init__()
        self.dims = d = dims
        self.encoder = AudioEncoder(d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head,
                                    d.n_audio_layer, d.conv_stride)  # frozen: no dropout
        self.decoder = LlamaAudioLM(d) if d.n_kv_head else AudioLM(d)
        self.ctc_head = None  # train.py's ctc_weight may add one
        self.apply(self._init_weights)

# -----------------------------------------------------------------------------
# a pretrained LLaMA-architecture chat LM (SmolLM2-135M-Instruct, read by checkpoint.load_gguf).
# Parameter names are Hugging Face's LlamaForCausalLM's, less its "model." prefix.

@dataclass
class LlamaDimensions:
    n_vocab: int = 49152
    n_ctx: int = 8192
    n_state: int = 576
    n_head: int = 9
    n_kv_head: int = 3          # grouped-query attention: each key/value head serves 3 query heads
    n_layer: int = 30
    n_mlp: int = 1536
    rope_base: float = 100000.0
    norm_eps: float = 1e-5

def rope(n_ctx, head_dim, base):
    """The rotary positions' cos and sin, (n_ctx, head_dim) each, in rotate_half's layout."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = (torch.arange(n_ctx).float()[:, None] * inv_freq[None, :]).repeat(1, 2)
    return angles.cos(), angles.sin()

def apply_rope(x, cos, sin):
    """x (B, H, T, hs) rotated by position: dimension i pairs with i + hs/2 (rotate_half)."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin

class LlamaAttention(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.n_head, self.n_kv_head, hs = dims.n_head, dims.n_kv_head, dims.n_state // dims.n_head
        self.q_proj = nn.Linear(dims.n_state, dims.n_head * hs, bias=False)
        self.k_proj = nn.Linear(dims.n_state, dims.n_kv_head * hs, bias=False)
        self.v_proj = nn.Linear(dims.n_state, dims.n_kv_head * hs, bias=False)
        self.o_proj = nn.Linear(dims.n_head * hs, dims.n_state, bias=False)

    def forward(self, x, cos, sin, kv_cache=None, mask=None):
        """cos, sin: (T, hs) or (B, 1, T, hs) at x's positions; kv_cache: the earlier positions'
        keys and values; mask: (B, T, Tk) True where a query sees a key (None: causal)."""
        B, T, _ = x.shape
        split = lambda y, h: y.view(B, T, h, -1).transpose(1, 2)  # (B, h, T, hs)
        q = apply_rope(split(self.q_proj(x), self.n_head), cos, sin)
        k = apply_rope(split(self.k_proj(x), self.n_kv_head), cos, sin)
        v = split(self.v_proj(x), self.n_kv_head)
        if kv_cache is not None:
            if self in kv_cache:  # append the new positions to the cached ones
                k, v = (torch.cat(pair, dim=2) for pair in zip(kv_cache[self], (k, v)))
            kv_cache[self] = (k, v)
        Tk, causal = k.shape[2], mask is None and 1 < T == k.shape[2]
        if mask is not None:
            mask = mask[:, None]
        elif 1 < T < Tk:  # new tokens after a cached prefix: each sees it and the new ones before
            mask = torch.ones(T, Tk, dtype=torch.bool, device=x.device).tril(Tk - T)
        y = F.scaled_dot_product_attention(q, k, v, mask, is_causal=causal, enable_gqa=True)
        return self.o_proj(y.transpose(1, 2).flatten(2))

class LlamaMLP(nn.Module):  # SwiGLU
    def __init__(self, n_state, n_mlp):
        super().__init__()
        self.gate_proj = nn.Linear(n_state, n_mlp, bias=False)
        self.up_proj = nn.Linear(n_state, n_mlp, bias=False)
        self.down_proj = nn.Linear(n_mlp, n_state, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

class LlamaBlock(nn.Module):
    def __init__(self, dims):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dims.n_state, eps=dims.norm_eps)
        self.self_attn = LlamaAttention(dims)
        self.post_attention_layernorm = nn.RMSNorm(dims.n_state, eps=dims.norm_eps)
        self.mlp = LlamaMLP(dims.n_state, dims.n_mlp)

    def forward(self, x, cos, sin, kv_cache=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv_cache, mask)
        return x + self.mlp(self.post_attention_layernorm(x))

class LlamaLM(nn.Module):
    """A LLaMA decoder with tied embeddings: tokens (B, T) -> logits (B, T, n_vocab). embeds
    (B, T, n_state), given instead of tokens, are its input (the audio-LLM's prompt with the
    audio frames spliced in); kv_cache: a dict, as Whisper's decoder takes."""
    def __init__(self, dims):
        super().__init__()
        self.dims = dims
        self.embed_tokens = nn.Embedding(dims.n_vocab, dims.n_state)
        self.layers = nn.ModuleList(LlamaBlock(dims) for _ in range(dims.n_layer))
        self.norm = nn.RMSNorm(dims.n_state, eps=dims.norm_eps)
        cos, sin = rope(dims.n_ctx, dims.n_state // dims.n_head, dims.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, tokens=None, kv_cache=None, embeds=None, positions=None, mask=None,
                project=True):
        """positions (B, T), mask (B, T, Tk): prompt_positions' (left-padded prompts), or None:
        consecutive after the cache, causal. project: as in tied_output."""
        x = self.embed_tokens(tokens) if embeds is None else embeds
        if positions is None:
            offset = cached(kv_cache, self.layers[0].self_attn)
            cos, sin = self.cos[offset:offset + x.shape[1]], self.sin[offset:offset + x.shape[1]]
        else:
            cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        for block in self.layers:
            x = block(x, cos, sin, kv_cache, mask)
        return tied_output(self.norm(x), self.embed_tokens, project)

class LlamaAudioLM(nn.Module):
    """AudioLM's job on a pretrained LLaMA (AudioLLMDimensions with n_kv_head > 0): the adapter's
    outputs at the <|audio|> slots of the LM's input embeddings, RoPE positions, tied output."""

    def __init__(self, d):
        super().__init__()
        self.audio_token = d.audio_token
        self.adapter = Adapter(d.n_audio_state, d.n_text_state)
        self.lm = LlamaLM(LlamaDimensions(d.n_vocab, d.n_text_ctx, d.n_text_state, d.n_text_head,
                                          d.n_kv_head, d.n_text_layer, d.n_mlp, d.rope_base,
                                          d.norm_eps))

    @property
    def token_embedding(self):  # what train.py and distill.py read as the tied output layer
        return self.lm.embed_tokens

    def forward(self, tokens, xa, kv_cache=None, project=True, xa_mask=None, pad_mask=None):
        """As AudioLM.forward."""
        offset = cached(kv_cache, self.lm.layers[0].self_attn)
        pos, mask = prompt_positions(tokens, offset, self.lm.dims.n_ctx, pad_mask)
        x = embed_audio(self, tokens, xa, xa_mask).to(xa.dtype)
        return self.lm(None, kv_cache, x, pos if pad_mask is not None else None, mask, project)
