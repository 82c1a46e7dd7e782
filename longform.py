"""
Long-form transcription: a clip over 30 s on Whisper weights, as openai-whisper's transcribe()
reads it (temperature 0, no previous text): 30-s windows decoded with timestamps. evaluate.py
calls transcribe_long for such clips.
"""
import math

import torch
import torch.nn.functional as F

from data import N_FRAMES

def timestamp_rules(logits, sampled, tok, max_initial=50):
    """openai-whisper's ApplyTimestampRules, in place on one sequence's logits (V,) after the
    tokens it has sampled: timestamps come in pairs (but for one before EOT) and never decrease, a
    segment is not empty, the first token is a timestamp <= 1.00 s (max_initial * 0.02 s), and a
    timestamp is forced where all of them together are likelier than the best text token."""
    tb, inf = tok.timestamp_begin, math.inf
    logits[tok.no_timestamps] = -inf
    last = len(sampled) >= 1 and sampled[-1] >= tb
    penultimate = len(sampled) < 2 or sampled[-2] >= tb
    if last and penultimate:  # a segment's start: text follows
        logits[tb:] = -inf
    elif last:  # a segment's end: the next one's start, or EOT
        logits[:tok.eot] = -inf
    stamps = [t for t in sampled if t >= tb]
    if stamps:  # not before the last one; a segment ends after it starts
        logits[tb:stamps[-1] + (0 if last and not penultimate else 1)] = -inf
    if not sampled:
        logits[:tb] = -inf
        logits[tb + max_initial + 1:] = -inf
    logp = logits.log_softmax(-1)
    if logp[tb:].logsumexp(-1) > logp[:tb].max():
        logits[:tb] = -inf
    return logits

def decode_window(model, tok, mel, prompt, max_new_tokens):
    """One window (n_mels, 3000) decoded greedily with timestamps -> (tokens without EOT, whether
    EOT came); the suppressions of generate, then timestamp_rules."""
    xa = model.encoder(mel[None])
    kv_cache, x, out = {}, torch.tensor([prompt], device=mel.device), []
    for step in range(max_new_tokens):
        logits = model.decoder(x, xa, kv_cache)[0, -1].float()
        logits[tok.suppress] = -math.inf
        if step == 0:
            logits[tok.suppress_blank] = -math.inf
        token = int(timestamp_rules(logits, out, tok).argmax())
        if token == tok.eot:
            return out, True
        out.append(token)
        x = torch.tensor([[token]], device=mel.device)
    return out, False

def transcribe_long(model, tok, mel, prompt, max_new_tokens=224):
    """A clip's whole mel (data.whisper_mel(audio, n_frames=None)) as Whisper's transcribe() reads
    it: consecutive windows of up to 3000 frames, zero-padded, decoded with timestamps; the next
    starts where the window's last complete segment ended, or after the window where its tokens
    end in a single timestamp or hold no complete segment -> (the text tokens of all windows,
    whether every window reached EOT)."""
    tb, n, seek = tok.timestamp_begin, mel.shape[1], 0
    frames_per_step = N_FRAMES // model.dims.n_audio_ctx  # 2 frames: a 0.02-s timestamp
    tokens, ended = [], True
    while seek < n:
        size = min(N_FRAMES, n - seek)
        window = F.pad(mel[:, seek:seek + size], (0, N_FRAMES - size))
        out, e = decode_window(model, tok, window, prompt, max_new_tokens)
        ended &= e
        stamp = [t >= tb for t in out]
        pairs = [i + 1 for i in range(len(out) - 1) if stamp[i] and stamp[i + 1]]
        if pairs and stamp[-2:] != [False, True]:  # the last segment is unfinished: next window
            out = out[:pairs[-1]]
            size = (out[-1] - tb) * frames_per_step
        tokens += [t for t in out if t < tok.eot]
        seek += size
    return tokens, ended
