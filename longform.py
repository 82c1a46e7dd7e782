"""
Whisper's transcribe() features on Whisper weights, as openai-whisper writes them (temperature 0,
no previous text): long-form transcription, a clip over 30 s as 30-s windows decoded with
timestamps (transcribe_long), and the no-speech check that gives silence and noise no words
(no_speech). evaluate.py calls both for Whisper weights.
"""
import math

import torch
import torch.nn.functional as F

from data import N_FRAMES
from decoding import mask_logits

NO_SPEECH_THRESHOLD, LOGPROB_THRESHOLD = 0.6, -1.0  # transcribe()'s defaults

def skip(no_speech_prob, avg_logprob):
    """transcribe()'s rule: a window gets no words where <|nospeech|> is likely at the first step
    and the transcript is not confident either."""
    return no_speech_prob > NO_SPEECH_THRESHOLD and avg_logprob < LOGPROB_THRESHOLD

@torch.no_grad()
def no_speech(model, tok, xa, prompt):
    """transcribe()'s no-speech check on a batch of 30-s windows (encoder outputs xa) -> a bool
    per window, True where it holds no speech. As transcribe() decides it by default: the
    <|nospeech|> probability after <|startoftranscript|> (step 0, unmasked), and where that is
    high, the average log-probability of the window's greedy decode with timestamps."""
    x = torch.tensor([prompt] * len(xa), device=xa.device)
    p_none = model.decoder(x, xa)[:, prompt.index(tok.sot)].float().softmax(-1)[:, tok.no_speech]
    timestamps = [t for t in prompt if t != tok.no_timestamps]
    return [p > NO_SPEECH_THRESHOLD and decode_window(model, tok, xa[b:b + 1], timestamps)[0]
            is None for b, p in enumerate(p_none.tolist())]

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

def decode_window(model, tok, xa, prompt, max_new_tokens=224, check_speech=True):
    """One window's encoder output (1, 1500, d) decoded greedily with timestamps -> (tokens
    without EOT, whether EOT came); the suppressions of generate, then timestamp_rules. Tokens
    None: no speech (with check_speech, transcribe()'s check)."""
    kv_cache, x, out = {}, torch.tensor([prompt], device=xa.device), []
    logprob, p_none = 0.0, None
    for step in range(max_new_tokens):
        logits = model.decoder(x, xa, kv_cache)[0].float()
        if step == 0:  # the no-speech check's probability, before any mask
            p_none = logits[prompt.index(tok.sot)].softmax(-1)[tok.no_speech].item()
        logits = mask_logits(logits[-1:], step, tok.suppress, tok.suppress_blank)[0]
        logits = timestamp_rules(logits, out, tok)
        token = int(logits.argmax())
        logprob += logits.log_softmax(-1)[token].item()
        if token == tok.eot:
            break
        out.append(token)
        x = torch.tensor([[token]], device=xa.device)
    if check_speech and skip(p_none, logprob / (len(out) + 1)):
        return None, True
    return out, token == tok.eot

def transcribe_long(model, tok, mel, prompt, max_new_tokens=224, check_speech=True):
    """A clip's whole mel (data.whisper_mel(audio, n_frames=None)) as Whisper's transcribe() reads
    it: consecutive windows of up to 3000 frames, zero-padded, decoded with timestamps; the next
    starts where the window's last complete segment ended, or after the window where its tokens
    end in a single timestamp or hold no complete segment -> (the text tokens of all windows,
    whether every window reached EOT). check_speech: windows without speech get no words."""
    tb, n, seek = tok.timestamp_begin, mel.shape[1], 0
    frames_per_step = N_FRAMES // model.dims.n_audio_ctx  # 2 frames: a 0.02-s timestamp
    tokens, ended = [], True
    while seek < n:
        size = min(N_FRAMES, n - seek)
        window = F.pad(mel[:, seek:seek + size], (0, N_FRAMES - size))
        xa = model.encoder(window[None])
        out, e = decode_window(model, tok, xa, prompt, max_new_tokens, check_speech)
        ended &= e
        if out is None:  # no speech: the whole window is skipped, as transcribe() does
            seek += size
            continue
        stamp = [t >= tb for t in out]
        pairs = [i + 1 for i in range(len(out) - 1) if stamp[i] and stamp[i + 1]]
        if pairs and stamp[-2:] != [False, True]:  # the last segment is unfinished: next window
            out = out[:pairs[-1]]
            size = (out[-1] - tb) * frames_per_step
        tokens += [t for t in out if t < tok.eot]
        seek += size
    return tokens, ended
