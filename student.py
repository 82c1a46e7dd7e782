"""
Students made from a teacher's weights: make_student (distil-whisper's init: the teacher's encoder,
maximally spaced decoder layers), make_audio_llm (the paper's student shape: encoder -> adapter
-> a causal LM made of the teacher's decoder layers, on a chat tokenizer) and make_chat_llm (the
paper's student for real: encoder -> adapter -> a pretrained chat LLM, on the LLM's tokenizer).
"""
from dataclasses import replace

import numpy as np
import torch

from checkpoint import load_gguf
from model import MERGE, WHISPER_FIELDS, AudioLLM, AudioLLMDimensions, Whisper
from tokenizer import ChatMLTokenizer, ChatTokenizer, GGUFTokenizer, token_map

def spaced_layers(n, k):
    """k maximally spaced layer indices out of n, first and last always kept: (6, 2) -> [0, 5]."""
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist())) if k > 1 else [n - 1]

def make_student(teacher, n_decoder_layers=2, freeze_encoder=True, n_encoder_layers=None):
    """distil-whisper init: the (thinned) encoder, embeddings, maximally spaced decoder layers."""
    td = teacher.dims
    enc_layers = spaced_layers(td.n_audio_layer, n_encoder_layers or td.n_audio_layer)
    dec_layers = spaced_layers(td.n_text_layer, n_decoder_layers)
    student = Whisper(replace(td, n_audio_layer=len(enc_layers), n_text_layer=len(dec_layers)))
    src = teacher.state_dict()
    sd = {}
    for k in student.state_dict():
        parts = k.split(".")
        if parts[1] == "blocks":
            parts[2] = str((enc_layers if parts[0] == "encoder" else dec_layers)[int(parts[2])])
        sd[k] = src[".".join(parts)].clone()
    student.load_state_dict(sd)
    if freeze_encoder:
        student.encoder.requires_grad_(False)
    n_s, n_t = student.get_num_params(), teacher.get_num_params()
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    print(f"student: encoder layers {enc_layers}, decoder layers {dec_layers} of the teacher's; "
          f"{n_s / 1e6:.2f}M params ({n_s / n_t:.0%} of {n_t / 1e6:.2f}M), "
          f"trainable {n_train / 1e6:.2f}M")
    return student

def make_audio_llm(teacher, tokenizer, n_layers=2, base=None):
    """The paper's student shape from a Whisper teacher -> (AudioLLM, ChatTokenizer): the teacher's
    encoder (frozen), an adapter, and a causal LM from n_layers maximally spaced decoder layers,
    two LM blocks each: the layer's self-attention (its MLP starts at zero: the block adds nothing
    else), then its cross-attention and MLP, so the LM starts out listening the way the teacher
    does (RESULTS.md: it learns far faster than from the self-attention blocks alone); positions
    and final LayerNorm. The adapter starts as the mean of each 4 frames. Token embeddings: the
    teacher's row of the same token string, else the mean of the teacher's tokens of that text;
    the role tokens start as the teacher's SOT, <|assistant|> as its last prompt token, <|im_end|>
    as its EOT. base: the student's text vocabulary (default: the teacher's)."""
    tok, td = ChatTokenizer(base or tokenizer), teacher.dims
    layers = spaced_layers(td.n_text_layer, n_layers)
    student = AudioLLM(AudioLLMDimensions(**dict(vars(td), n_vocab=tok.n_vocab, ctc=False,
                                                 n_text_layer=2 * len(layers),
                                                 audio_token=tok.audio)))
    student.encoder.load_state_dict(teacher.encoder.state_dict())
    src, lm = teacher.decoder, student.decoder
    for i, layer in enumerate(layers):
        t, own, cross = src.blocks[layer], lm.blocks[2 * i], lm.blocks[2 * i + 1]
        own.attn.load_state_dict(t.attn.state_dict())
        own.attn_ln.load_state_dict(t.attn_ln.state_dict())
        torch.nn.init.zeros_(own.mlp[2].weight)
        torch.nn.init.zeros_(own.mlp[2].bias)
        cross.attn.load_state_dict(t.cross_attn.state_dict())
        cross.attn_ln.load_state_dict(t.cross_attn_ln.state_dict())
        cross.mlp.load_state_dict(t.mlp.state_dict())
        cross.mlp_ln.load_state_dict(t.mlp_ln.state_dict())
    with torch.no_grad():
        lm.positional_embedding.copy_(src.positional_embedding)
        lm.ln.load_state_dict(src.ln.state_dict())
        # the adapter: its LayerNorm scaled and shifted like the encoder's last one, then the mean
        # of each 4 frames (Whisper's widths are equal: C = d)
        ad, C = lm.adapter, td.n_audio_state
        ad.ln.load_state_dict(teacher.encoder.ln_post.state_dict())
        mean, eye = torch.eye(C).repeat(1, MERGE) / MERGE, torch.eye(C)  # (C, 4 C), (C, C)
        ad.fc1.weight.copy_(torch.cat([mean, -mean]))  # fc2(GELU(fc1 x)) = GELU(m) - GELU(-m) = m
        ad.fc2.weight.copy_(torch.cat([eye, -eye], 1))
        ad.fc1.bias.zero_()
        ad.fc2.bias.zero_()
        W, emb = src.token_embedding.weight, lm.token_embedding.weight
        s2t = token_map(tok, tokenizer)
        for i, t in enumerate(s2t.tolist()[:tok.n_base]):
            ids = [t] if t >= 0 else tokenizer.encode(tok.decode([i])) or [tokenizer.eot]
            emb[i] = W[ids].mean(0)
        for name, t in zip(ChatTokenizer.ROLES, [tokenizer.sot, tokenizer.sot_sequence()[-1]] +
                           [tokenizer.sot] * 3 + [tokenizer.eot]):
            emb[tok.specials[name]] = W[t]
    student.encoder.requires_grad_(False)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    print(f"audio-LLM student: LM blocks from layers {layers} of the teacher's decoder (self-, "
          f"cross-attention), vocab {tok.n_vocab}; {student.get_num_params() / 1e6:.2f}M params, "
          f"trainable {n_train / 1e6:.2f}M")
    return student, tok

def make_chat_llm(teacher, gguf_path, n_layers=30, n_ctx=640):
    """The paper's student shape on a pretrained chat LLM -> (AudioLLM, ChatMLTokenizer): the
    teacher's encoder (frozen), a fresh adapter (the paper's init), and n_layers maximally spaced
    blocks of the GGUF's LLaMA (all 30 of SmolLM2-135M-Instruct by default) with its final norm
    and tied embeddings; the three audio tokens start as the mean embedding. n_ctx: the positions
    kept (30 s of audio is 375 tokens; a looping transcript stops at the end of them)."""
    lm, ld, meta = load_gguf(gguf_path)
    tok, layers = ChatMLTokenizer(GGUFTokenizer(meta)), spaced_layers(ld.n_layer, n_layers)
    whisper = {k: getattr(teacher.dims, k) for k in WHISPER_FIELDS if k.startswith('n_audio')}
    student = AudioLLM(AudioLLMDimensions(
        **whisper, n_mels=teacher.dims.n_mels, n_vocab=tok.n_vocab, n_text_ctx=n_ctx,
        n_text_state=ld.n_state, n_text_head=ld.n_head, n_text_layer=len(layers),
        audio_token=tok.audio, n_kv_head=ld.n_kv_head, n_mlp=ld.n_mlp, rope_base=ld.rope_base,
        norm_eps=ld.norm_eps))
    student.encoder.load_state_dict(teacher.encoder.state_dict())
    target = student.decoder.lm
    for i, layer in enumerate(layers):
        target.layers[i].load_state_dict(lm.layers[layer].state_dict())
    target.norm.load_state_dict(lm.norm.state_dict())
    with torch.no_grad():
        emb = lm.embed_tokens.weight
        target.embed_tokens.weight.copy_(torch.cat([emb, emb.mean(0).expand(3, -1)]))
    student.encoder.requires_grad_(False)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    print(f"chat-LLM student: blocks {layers} of {ld.n_layer} of {gguf_path}, vocab "
          f"{tok.n_vocab} ({tok.n_base} + {len(tok.AUDIO)} audio tokens); "
          f"{student.get_num_params() / 1e6:.2f}M params, trainable {n_train / 1e6:.2f}M")
    return student, tok
