"""
Transcribe a manifest with a checkpoint and score it: corpus-level WER (English) or CER (Mandarin).
Also batched decoding (decode, transcribe). Whisper weights get the features of Whisper's
transcribe(), and a clip over 30 s is transcribed in 30-s windows with timestamps as transcribe()
does (longform.py); our models refuse a clip longer than their encoder takes.

    python evaluate.py --ckpt=out/ckpt.pt --manifest=data/grammar/test.jsonl --out=results.json
    python evaluate.py --ckpt=weights/whisper-tiny.en --manifest=data/ls_test_clean.jsonl --beam=5
    python evaluate.py --ckpt=weights/base --manifest=unlabeled.jsonl --out_manifest=pseudo.jsonl
"""
import json
import os
import sys
import time

import numpy as np
import soundfile as sf
import torch

import data
from checkpoint import load_checkpoint
from decoding import beam_search, generate
from longform import no_speech, transcribe_long
from tokenizer import WhisperTokenizer
from score import score
from model import AudioLLM, length_mask

# -----------------------------------------------------------------------------
# decoding

def whisper_frames(model, tokenizer):
    """Whisper weights (n_audio_ctx 1500, a Whisper tokenizer) and the audio-LLM on a Whisper
    encoder only know 30-s windows: 3000 mel frames; None for our models (mels padded to the
    longest in the batch)."""
    whisper = model.dims.n_audio_ctx == 1500 and (
        isinstance(tokenizer, WhisperTokenizer) or isinstance(model, AudioLLM))
    return data.N_FRAMES if whisper else None

def _duration(row):
    if row.get("duration") is not None:
        return float(row["duration"])
    try:
        return sf.info(row["audio"]).duration
    except Exception:
        return 0.0  # unknown: load_audio will name the problem

def _frames(path):  # mel frames (10 ms) of the audio at 16 kHz, from its header; 0 if unreadable
    try:
        info = sf.info(path)
    except Exception:
        return 0  # load_audio will name the problem
    return round(info.frames * data.SAMPLE_RATE / info.samplerate) // data.HOP_LENGTH

def too_long(model, tokenizer, rows, n_frames=None):
    """-> ([(row, frames)] of the rows longer than the model's encoder takes, that limit in mel
    frames). Our models' encoders take n_audio_ctx * conv_stride frames (or n_frames); Whisper
    weights have no limit: they transcribe a long clip in 30-s windows
    (transcribe_long)."""
    if whisper_frames(model, tokenizer) and not isinstance(model, AudioLLM):
        return [], None
    limit = model.dims.n_audio_ctx * getattr(model.dims, "conv_stride", 2)
    limit = min(n_frames or limit, limit)
    return [(row, f) for row in rows if (f := _frames(row["audio"])) > limit], limit

@torch.no_grad()
def decode(model, tokenizer, rows, batch_size=16, beam=1, language=None, encode=None,
           max_new_tokens=None, temperature=0.0, generator=None, n_frames=None, truncate=False,
           done=None, check_speech=False):
    """Decode every row's audio: greedy, sampling (temperature > 0) or beam search (beam > 1).
    Returns (tokens, ended) in the order of rows: the token ids without prompt and EOT, and whether
    EOT was reached. Rows are batched by prompt (language) and sorted by duration; mels are padded
    like data.Batches does. Whisper weights get transcribe()'s features: a clip up to 30 s is one
    window (n_frames=3000, data.whisper_mel), a longer one goes through transcribe_long (greedy),
    check_speech: its no-speech check (longform.no_speech). Our models refuse a clip longer than
    their encoder takes (a ValueError naming it), or with truncate=True cut it there. encode(mel,
    paths): the encoder output (an EncoderCache, say; not for long clips), by default
    model.encoder. done: a dict to fill with row index -> (tokens, ended) as rows finish."""
    if beam > 1 and temperature > 0:
        raise ValueError("decode: beam search or sampling, not both")
    audio_llm = isinstance(model, AudioLLM)
    if beam > 1 and audio_llm:  # beam search is Whisper's only
        raise ValueError("the audio-LLM decodes greedily or by sampling (no beam search)")
    windowed = whisper_frames(model, tokenizer) is not None and not audio_llm  # in 30-s windows
    n_frames = n_frames or whisper_frames(model, tokenizer)
    beyond, limit = too_long(model, tokenizer, rows, n_frames)
    if beyond and not truncate:
        (row, frames), more = beyond[0], len(beyond) - 1
        raise ValueError(f"{row['audio']}: {frames / 100:.2f} s of audio, longer than the model's "
                         f"limit of {limit / 100:.2f} s ({limit} mel frames)"
                         f"{f' (and {more} more clips)' if more else ''}; --truncate=True "
                         "(decode's truncate=True) cuts them")
    if max_new_tokens is None:
        max_new_tokens = model.dims.n_text_ctx // 2  # Whisper's sample_len
    kw = dict(max_new_tokens=max_new_tokens, suppress=tokenizer.suppress,
              suppress_blank=tokenizer.suppress_blank)
    device, n_mels = next(model.parameters()).device, model.dims.n_mels
    longest = model.dims.n_audio_ctx * getattr(model.dims, "conv_stride", 2)  # the encoder's input
    prompts = [tuple(tokenizer.sot_sequence(language or row.get("lang"))) for row in rows]
    order = sorted(range(len(rows)), key=lambda k: (prompts[k], _duration(rows[k])))
    batches = []
    for k in order:  # a new batch where it is full or where the prompt changes
        if batches and len(batches[-1]) < batch_size and prompts[batches[-1][0]] == prompts[k]:
            batches[-1].append(k)
        else:
            batches.append([k])
    done = {} if done is None else done
    was_training = model.training
    model.eval()
    for idx in batches:
        audio = {k: data.load_audio(rows[k]["audio"]) for k in idx}
        long = [k for k in idx if windowed and len(audio[k]) // data.HOP_LENGTH > data.N_FRAMES]
        for k in long:  # over 30 s: Whisper's windows, one clip at a time
            prompt = [t for t in prompts[k] if t != tokenizer.no_timestamps]  # timestamps on
            mel = data.whisper_mel(audio[k], n_mels, n_frames=None).to(device)
            done[k] = transcribe_long(model, tokenizer, mel, prompt, max_new_tokens, check_speech)
        idx = [k for k in idx if k not in long]
        if not idx:
            continue
        mels = [data.utterance_mel(audio[k], n_mels, n_frames) for k in idx]  # (mel, pad, n)
        T = min(n_frames or max(m.shape[1] for m, _, _ in mels), longest)
        mel = torch.empty(len(idx), n_mels, T)
        for b, (m, pad, _) in enumerate(mels):
            mel[b].fill_(pad)
            mel[b, :, :min(T, m.shape[1])] = m[:, :T]
        mel = mel.to(device)
        # padded to the longest in the batch: the padding is masked, so a clip's transcript does
        # not depend on its batch (Whisper's 30-s window is not: the model was trained reading it)
        n = torch.tensor([min(n, T) for _, _, n in mels], device=device)
        mask = None if n_frames else length_mask(n, T)
        xa = encode(mel, [rows[k]["audio"] for k in idx]) if encode else model.encoder(mel, mask)
        prompt, m = list(prompts[idx[0]]), model.encoder.frames_mask(mask)
        if audio_llm:  # a prompt per clip, an <|audio|> per audio token of its real frames
            prompt = [tokenizer.prompt(k) for k in n.tolist()]
            m = model.encoder.frames_mask(length_mask(n, T))
        if beam > 1:
            out = beam_search(model, xa, prompt, tokenizer.eot, beam_size=beam, xa_mask=m, **kw)
        else:
            out = generate(model, xa, prompt, tokenizer.eot, temperature=temperature,
                           generator=generator, xa_mask=m, **kw)
        silent = (no_speech(model, tokenizer, xa, prompt) if check_speech and windowed
                  else [False] * len(idx))
        for j, k in enumerate(idx):
            done[k] = ([], True) if silent[j] else (out.tokens[j], out.ended[j])
    model.train(was_training)
    return [done[k][0] for k in range(len(rows))], [done[k][1] for k in range(len(rows))]

def transcribe(model, tokenizer, rows, batch_size=16, beam=1, language=None, n_frames=None,
               max_new_tokens=None, encode=None, truncate=False, check_speech=False):
    """decode's transcripts as text, stripped, in the order of rows."""
    tokens, _ = decode(model, tokenizer, rows, batch_size, beam, language, encode, max_new_tokens,
                       n_frames=n_frames, truncate=truncate, check_speech=check_speech)
    return [tokenizer.decode(t).strip() for t in tokens]

# -----------------------------------------------------------------------------
# report and the command line

def report(rows, hyps, wall, language=None):
    """Score the labelled rows; returns the results dict that --out writes."""
    labelled = [k for k, row in enumerate(rows) if row.get("text") is not None]
    langs = [language or rows[k].get("lang") or "en" for k in labelled]
    lang = max(set(langs), key=langs.count) if langs else (language or "en")
    unit, normalize = (("char", "zh") if lang.startswith("zh") else
                       ("word", "en" if lang.startswith("en") else "basic"))
    res = score([rows[k]["text"] for k in labelled], [hyps[k] for k in labelled], unit, normalize,
                per_utt=True)
    errors = {k: s + d + i for k, (n, s, d, i) in zip(labelled, res["utts"])}
    utt_rates = [(s + d + i) / n for n, s, d, i in res["utts"] if n]
    audio_seconds = sum(_duration(row) for row in rows)
    return {
        "metric": "cer" if unit == "char" else "wer", "language": lang, "normalizer": normalize,
        "wer": res["wer"], "n": res["n"], "s": res["s"], "d": res["d"], "i": res["i"],
        "utterances": len(rows), "scored": len(labelled), "audio_seconds": audio_seconds,
        "rtfx": audio_seconds / max(wall, 1e-9),
        "median_utt_wer": float(np.median(utt_rates)) if utt_rates else None,
        "utts": [{"audio": r["audio"], "ref": r.get("text"), "hyp": h, "errors": errors.get(k)}
                 for k, (r, h) in enumerate(zip(rows, hyps))],
    }

def print_table(res):
    med = "-" if res["median_utt_wer"] is None else f"{100 * res['median_utt_wer']:.2f}"
    print(f"{res['metric'].upper():>9} {'N':>8} {'S':>7} {'D':>7} {'I':>7} {'utts':>6} "
          f"{'scored':>6} {'audio_s':>9} {'RTFx':>8} {'med_utt':>8}")
    print(f"{100 * res['wer']:8.2f}% {res['n']:>8} {res['s']:>7} {res['d']:>7} {res['i']:>7} "
          f"{res['utterances']:>6} {res['scored']:>6} {res['audio_seconds']:>9.1f} "
          f"{res['rtfx']:>8.1f} {med:>8}")

def _write_json(res, path):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(res, f, ensure_ascii=False, indent=1)
    os.replace(path + ".tmp", path)

def main():
    ckpt = ""  # our checkpoint .pt, or Whisper weights (.pt / Hugging Face dir / CTranslate2 dir)
    manifest = ""  # JSONL: {"audio", "text" (optional), "lang" (optional), "duration" (optional)}
    beam = 1  # 1 = greedy (a clip over 30 s on Whisper weights is decoded greedily in any case)
    out = ""  # write the results as JSON here
    out_manifest = ""  # write the rows with the hypotheses as "text" here (pseudo-labels)
    language = ""  # overrides each row's "lang": prompt language and metric (zh -> CER)
    batch_size = 16
    max_utts = 0  # 0 = all
    truncate = False  # our models: cut a clip longer than the encoder takes (default: refuse it)
    device = ""  # default: cuda if available
    g = dict(locals())  # configurator.py overrides these from --key=value
    exec(open(os.path.join(os.path.dirname(__file__) or ".", "configurator.py")).read(), g)
    device = g["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if not g["ckpt"] or not g["manifest"]:
        raise ValueError("give --ckpt=PATH and --manifest=PATH")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device={device}: CUDA is not available here (try --device=cpu)")
    for key, least in (("batch_size", 1), ("beam", 1), ("max_utts", 0)):
        if g[key] < least:
            raise ValueError(f"--{key}={g[key]}: must be at least {least}")
    for path in filter(None, (g["out"], g["out_manifest"])):  # fail now, not after transcribing
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{path}: folder {os.path.dirname(os.path.abspath(path))} not found")
    rows = data.read_manifest(g["manifest"])[:g["max_utts"] or None]
    if not rows:
        raise ValueError(f"{g['manifest']}: no rows to transcribe (--max_utts={g['max_utts']})")
    data.check_audio(rows)  # every header now: a missing or unreadable file before any decoding
    model, tokenizer, ours = load_checkpoint(g["ckpt"], device)  # ours None: Whisper weights
    language = g["language"] or None
    beyond, limit = too_long(model, tokenizer, rows)  # refused by decode unless --truncate=True
    whisper = whisper_frames(model, tokenizer) is not None  # a clip over 30 s: in windows
    windowed = sum(_frames(r["audio"]) > data.N_FRAMES for r in rows) if whisper else 0
    t0, done = time.time(), {}
    try:
        tokens, ended = decode(model, tokenizer, rows, g["batch_size"], g["beam"], language,
                               truncate=g["truncate"], done=done, check_speech=ours is None)
    except Exception as e:  # a clip that fails on reading, say: keep the finished transcripts
        if g["out"] and done:
            keep = sorted(done)
            res = report([rows[k] for k in keep], [tokenizer.decode(done[k][0]).strip()
                                                   for k in keep], time.time() - t0, language)
            _write_json(dict(res, complete=False, error=str(e)), g["out"])
            print(f"wrote {g['out']}: {len(keep)} of {len(rows)} transcripts (incomplete)")
        raise
    hyps = [tokenizer.decode(t).strip() for t in tokens]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    res = report(rows, hyps, time.time() - t0, language)
    res.update(complete=True, truncated=len(beyond), windowed=windowed)
    print_table(res)
    if res["scored"] < res["utterances"]:
        print(f"scored {res['scored']} of {res['utterances']} utterances (the others have no text)")
    if windowed:
        print(f"{windowed} clips over 30 s: transcribed in 30-s windows with timestamps (greedy)")
    if res["truncated"]:
        print(f"truncated {res['truncated']} clips to the model's {limit / 100:.2f} s "
              "(--truncate=True): their transcripts miss the rest")
    if g["out"]:
        _write_json(res, g["out"])
        print(f"wrote {g['out']}")
    if g["out_manifest"]:  # pseudo-labels: drop a transcript cut before EOT (a loop) or empty
        kept = [dict(row, text=h) for row, h, e in zip(rows, hyps, ended) if e and h]
        data.write_manifest(g["out_manifest"], kept)
        print(f"wrote {g['out_manifest']}: kept {len(kept)} of {len(rows)} rows (ended, non-empty)")

def cli():  # errors as one line on stderr, exit status 1
    try:
        main()
    except (OSError, ValueError, ImportError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(1)

if __name__ == "__main__":
    cli()
