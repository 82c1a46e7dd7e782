"""
Transcribe a manifest with a checkpoint and score it: corpus-level WER (English) or CER (Mandarin).
Also the project's one model loader (load_checkpoint), batched decoding (decode, transcribe) and
the cache of a frozen encoder's outputs (EncoderCache).

    python evaluate.py --ckpt=out/ckpt.pt --manifest=data/grammar/test.jsonl --out=results.json
    python evaluate.py --ckpt=weights/whisper-tiny.en --manifest=data/ls_test_clean.jsonl --beam=5
    python evaluate.py --ckpt=weights/base --manifest=unlabeled.jsonl --out_manifest=pseudo.jsonl
"""
import hashlib
import json
import os
import re
import sys
import time
from contextlib import nullcontext

import numpy as np
import torch

import data
import whisper_io
from score import score
from model import ModelDimensions, Whisper

# -----------------------------------------------------------------------------
# models: the one loader, and a cache of a frozen encoder's outputs

def _line(e):  # an exception in one line; of torch.load's page-long ones, the reason
    text = str(e).split("WeightsUnpickler error:")[-1].strip()
    return f"{type(e).__name__}: {text.splitlines()[0].split('. ')[0] if text else ''}"

def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode on device, tokenizer, ckpt). ckpt is our training checkpoint's dict
    {model, model_args, tokenizer, optimizer, iter_num, ...}, or None for Whisper weights (an
    openai-whisper .pt, a Hugging Face or CTranslate2 directory: whisper_io.load_whisper).
    Bad input raises ValueError, one line naming the file."""
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: checkpoint not found")
    ckpt = None
    if os.path.isfile(path) and os.path.basename(path) != "model.bin":  # model.bin: CTranslate2
        try:  # weights_only: tensors, numbers, strings, bytes and containers; no arbitrary objects
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: torch.load(weights_only=True) fails ({_line(e)})") from None
        if isinstance(ckpt, dict) and "dims" in ckpt and "model_state_dict" in ckpt:
            ckpt = None  # openai-whisper's format
        elif not (isinstance(ckpt, dict) and {"model", "model_args", "tokenizer"} <= ckpt.keys()):
            raise ValueError(f"{path}: unknown format: neither our checkpoint (model, model_args, "
                             "tokenizer) nor openai-whisper weights (dims, model_state_dict)")
    if ckpt is None:
        model, tokenizer = whisper_io.load_whisper(path)
        return model.to(device).eval(), tokenizer, None
    try:
        model = Whisper(ModelDimensions(**ckpt["model_args"]))
        prefix = r"^(_orig_mod\.|module\.)+"  # added by torch.compile and DDP
        model.load_state_dict({re.sub(prefix, "", k): v for k, v in ckpt["model"].items()})
        tokenizer = whisper_io.tokenizer_from_dict(ckpt["tokenizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: bad checkpoint ({_line(e)})") from None
    return model.to(device).eval(), tokenizer, ckpt

class EncoderCache:
    """Outputs of a frozen encoder per audio file, rounded to float16, in memory and optionally on
    disk. Only valid when every mel has the same length (n_frames fixed, e.g. Whisper's 30-s
    window): otherwise the padding changes them."""

    def __init__(self, encoder, directory="", ctx=nullcontext()):
        self.encoder, self.directory, self.ctx, self.mem = encoder, directory, ctx, {}
        w = encoder.conv1.weight  # tells encoders apart in a shared cache directory
        self.tag = f"{w.sum().item():.6e}{w.shape}{encoder.ln_post.weight.sum().item():.6e}"
        if directory:
            os.makedirs(directory, exist_ok=True)

    def _file(self, path, T):  # size and mtime in the key: a regenerated corpus is not read stale
        st = os.stat(path)
        key = f"{self.tag}|{T}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}"
        return os.path.join(self.directory, hashlib.sha1(key.encode()).hexdigest() + ".pt")

    @torch.no_grad()
    def __call__(self, mel, paths):
        T = mel.shape[-1]
        missing = [b for b, p in enumerate(paths) if (p, T) not in self.mem]
        for b in list(missing):
            file = self._file(paths[b], T) if self.directory else None
            if file and os.path.exists(file):
                self.mem[paths[b], T] = torch.load(file, map_location="cpu", weights_only=True)
                missing.remove(b)
        if missing:
            with self.ctx:
                out = self.encoder(mel[missing]).to(torch.float16).cpu()
            for b, xa in zip(missing, out):
                self.mem[paths[b], T] = xa.clone()
                if self.directory:
                    file = self._file(paths[b], T)
                    torch.save(xa.clone(), file + ".tmp")
                    os.replace(file + ".tmp", file)
        return torch.stack([self.mem[p, T] for p in paths]).to(mel.device).float()

# -----------------------------------------------------------------------------
# decoding

def whisper_frames(model, tokenizer):
    """Whisper weights (n_audio_ctx 1500, a Whisper tokenizer) only know 30-s windows: 3000 mel
    frames; None for our models (mels padded to the longest in the batch)."""
    whisper = model.dims.n_audio_ctx == 1500 and isinstance(tokenizer, whisper_io.WhisperTokenizer)
    return data.N_FRAMES if whisper else None

def _duration(row):
    if row.get("duration") is not None:
        return float(row["duration"])
    import soundfile as sf
    try:
        return sf.info(row["audio"]).duration
    except Exception:
        return 0.0  # unknown: load_audio will name the problem

@torch.no_grad()
def decode(model, tokenizer, rows, batch_size=16, beam=1, language=None, encode=None,
           max_new_tokens=None, temperature=0.0, generator=None, n_frames=None):
    """Decode every row's audio: greedy, sampling (temperature > 0) or beam search (beam > 1).
    Returns (tokens, ended) in the order of rows: the token ids without prompt and EOT, and whether
    EOT was reached. Rows are batched by prompt (language) and sorted by duration; mels are padded
    like data.Batches does; Whisper weights (n_audio_ctx 1500 and a Whisper tokenizer) get
    Whisper's 30-s window (n_frames=3000). encode(mel, paths): the encoder output (an EncoderCache,
    say); by default model.encoder(mel)."""
    if beam > 1 and temperature > 0:
        raise ValueError("decode: beam search or sampling, not both")
    n_frames = n_frames or whisper_frames(model, tokenizer)
    if max_new_tokens is None:
        max_new_tokens = model.dims.n_text_ctx // 2  # Whisper's sample_len
    encode = encode or (lambda mel, paths: model.encoder(mel))
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
    tokens, ended = [None] * len(rows), [None] * len(rows)
    was_training = model.training
    model.eval()
    for idx in batches:
        mels = []  # (mel, the value to pad it with)
        for k in idx:
            audio = data.load_audio(rows[k]["audio"])
            if n_frames == data.N_FRAMES:
                mels.append((data.whisper_mel(audio, n_mels), 0.0))
            else:
                mels.append(data.utterance_mel(audio, n_mels, n_frames)[:2])
        T = min(n_frames or max(m.shape[1] for m, _ in mels), longest)
        mel = torch.empty(len(idx), n_mels, T)
        for b, (m, pad) in enumerate(mels):
            mel[b].fill_(pad)
            mel[b, :, :min(T, m.shape[1])] = m[:, :T]
        xa = encode(mel.to(device), [rows[k]["audio"] for k in idx])
        prompt = list(prompts[idx[0]])
        if beam > 1:
            out = model.beam_search(xa, prompt, tokenizer.eot, beam_size=beam, **kw)
        else:
            out = model.generate(xa, prompt, tokenizer.eot, temperature=temperature,
                                 generator=generator, **kw)
        for j, k in enumerate(idx):
            tokens[k], ended[k] = out.tokens[j], out.ended[j]
    model.train(was_training)
    return tokens, ended

def transcribe(model, tokenizer, rows, batch_size=16, beam=1, language=None, n_frames=None,
               max_new_tokens=None, encode=None):
    """decode's transcripts as text, stripped, in the order of rows."""
    tokens, _ = decode(model, tokenizer, rows, batch_size, beam, language, encode, max_new_tokens,
                       n_frames=n_frames)
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

def main():
    ckpt = ""  # our checkpoint .pt, or Whisper weights (.pt / Hugging Face dir / CTranslate2 dir)
    manifest = ""  # JSONL: {"audio", "text" (optional), "lang" (optional), "duration" (optional)}
    beam = 1  # 1 = greedy
    out = ""  # write the results as JSON here
    out_manifest = ""  # write the rows with the hypotheses as "text" here (pseudo-labels)
    language = ""  # overrides each row's "lang": prompt language and metric (zh -> CER)
    batch_size = 16
    max_utts = 0  # 0 = all
    device = ""  # default: cuda if available
    g = dict(locals())  # configurator.py overrides these from --key=value
    exec(open(os.path.join(os.path.dirname(__file__) or ".", "configurator.py")).read(), g)
    device = g["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if not g["ckpt"] or not g["manifest"]:
        raise ValueError("give --ckpt=PATH and --manifest=PATH")
    for path in filter(None, (g["out"], g["out_manifest"])):  # fail now, not after transcribing
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"{path}: folder {os.path.dirname(os.path.abspath(path))} not found")
    rows = data.read_manifest(g["manifest"])
    if g["max_utts"]:
        rows = rows[:g["max_utts"]]
    model, tokenizer, _ = load_checkpoint(g["ckpt"], device)
    t0 = time.time()
    tokens, ended = decode(model, tokenizer, rows, g["batch_size"], g["beam"],
                           g["language"] or None)
    hyps = [tokenizer.decode(t).strip() for t in tokens]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    res = report(rows, hyps, time.time() - t0, g["language"] or None)
    print_table(res)
    if res["scored"] < res["utterances"]:
        print(f"scored {res['scored']} of {res['utterances']} utterances (the others have no text)")
    if g["out"]:
        with open(g["out"] + ".tmp", "w", encoding="utf-8") as f:
            json.dump(res, f, ensure_ascii=False, indent=1)
        os.replace(g["out"] + ".tmp", g["out"])
        print(f"wrote {g['out']}")
    if g["out_manifest"]:  # pseudo-labels: drop a transcript cut before EOT (a loop) or empty
        kept = [dict(row, text=h) for row, h, e in zip(rows, hyps, ended) if e and h]
        data.write_manifest(g["out_manifest"], kept)
        print(f"wrote {g['out_manifest']}: kept {len(kept)} of {len(rows)} rows (ended, non-empty)")

if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, ImportError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(1)
