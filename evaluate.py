"""
Transcribe a manifest with a checkpoint and score it: corpus-level WER (English) or CER (Mandarin).

    python evaluate.py --ckpt=out/ckpt.pt --manifest=data/grammar/test.jsonl --out=results.json
    python evaluate.py --ckpt=weights/whisper-tiny.en --manifest=data/ls_test_clean.jsonl --beam=5

Scoring (score) gives exactly jiwer's numbers (jiwer.process_words / process_characters, checked in tests/test_scorer.py):
- rate = (S + D + I) / N over the whole corpus (not the mean of per-utterance rates); if N == 0, jiwer returns the
  number of insertions as the "rate", and so do we.
- words: runs of 2+ whitespace characters become one space, the ends are stripped, then split on " " (jiwer's wer_default;
  a single tab or newline inside a string therefore stays inside a word, as in jiwer).
- chars: the ends are stripped, then every character is a unit, inner spaces included (jiwer's cer_default).
- S/D/I split: several alignments can have the same cost; we pick the one rapidfuzz's Levenshtein.opcodes picks (jiwer
  calls it): strip the common prefix and suffix, run Hyyro's bit-parallel Levenshtein, and walk back from the end,
  preferring a deletion, then an insertion, then the diagonal (see _edits). rapidfuzz switches to Hirschberg's algorithm
  only for huge pairs (about 2,000 x 2,000 units and up), far beyond one utterance; there ties could split differently.

Normalisers (applied to reference and hypothesis alike before scoring):
- normalize_en: a documented subset of openai-whisper's EnglishTextNormalizer:
  lower-case; drop [bracketed] / <tagged> / (parenthesised) spans and the fillers hmm mm mhm mmm uh um; expand the
  contractions in CONTRACTIONS (won't -> will not, can't -> can not, let's -> let us, n't -> not, 're -> are, 's -> is,
  'd -> would, 'll -> will, 't -> not, 've -> have, 'm -> am, plus 'd been / 's been -> had / has been ...; like Whisper,
  possessives become "is" too: "john's" -> "john is", harmless since both sides get it) and the title
  abbreviations (mr -> mister, dr -> doctor ...); drop diacritics; commas between digits go ("1,000" -> "1000");
  every other punctuation mark or symbol becomes a space (apostrophes left after expansion too: "o'clock" -> "o clock");
  spelled-out cardinals become digits (_numbers: "three" -> "3", "twenty one" / "twenty-one" -> "21",
  "five thousand three hundred and two" -> "5302", adjacent number words concatenate like Whisper's: "nineteen ninety
  nine" -> "1999", "one two three" -> "123"; a lone "one" stays a word: "one of them"); whitespace collapsed.
  Not done (Whisper does): ordinals (second -> 2nd), decimals ("three point five"), currency and percent, "a half",
  British -> American spellings, and keeping "." / "$" / "%" inside numbers. Checked equal to Whisper's on ordinary
  sentences (tests/test_scorer.py); odd runs differ ("hundred hundred", and Whisper's "ten o'clock" -> "100 clock").
- normalize_zh: lower-case, drop all whitespace, punctuation and symbols (CJK and ASCII, by Unicode category P*, S*, Z*,
  C*); score with unit="char", one unit per remaining character.
"""
import os
import re
import sys
import json
import time
import unicodedata

import numpy as np

# -----------------------------------------------------------------------------
# normalisers

FILLERS = r"\b(hmm|mm|mhm|mmm|uh|um)\b"
CONTRACTIONS = {  # applied in this order, after lower-casing (openai-whisper's list)
    r"\bwon't\b": "will not", r"\bcan't\b": "can not", r"\blet's\b": "let us", r"\bain't\b": "aint",
    r"\by'all\b": "you all", r"\bwanna\b": "want to", r"\bgotta\b": "got to", r"\bgonna\b": "going to",
    r"\bi'ma\b": "i am going to", r"\bimma\b": "i am going to", r"\bwoulda\b": "would have",
    r"\bcoulda\b": "could have", r"\bshoulda\b": "should have", r"\bma'am\b": "madam",
    r"\bmr\b": "mister ", r"\bmrs\b": "missus ", r"\bst\b": "saint ", r"\bdr\b": "doctor ", r"\bprof\b": "professor ",
    r"\bcapt\b": "captain ", r"\bgov\b": "governor ", r"\bald\b": "alderman ", r"\bgen\b": "general ",
    r"\bsen\b": "senator ", r"\brep\b": "representative ", r"\bpres\b": "president ", r"\brev\b": "reverend ",
    r"\bhon\b": "honorable ", r"\basst\b": "assistant ", r"\bassoc\b": "associate ", r"\blt\b": "lieutenant ",
    r"\bcol\b": "colonel ", r"\bjr\b": "junior ", r"\bsr\b": "senior ", r"\besq\b": "esquire ",
    r"'d been\b": " had been", r"'s been\b": " has been", r"'d gone\b": " had gone", r"'s gone\b": " has gone",
    r"'d done\b": " had done", r"'s got\b": " has got",
    r"n't\b": " not", r"'re\b": " are", r"'s\b": " is", r"'d\b": " would", r"'ll\b": " will", r"'t\b": " not",
    r"'ve\b": " have", r"'m\b": " am",
}
ONES = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve thirteen "
                                   "fourteen fifteen sixteen seventeen eighteen nineteen".split())}
TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
MULTIPLIERS = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}

def _strip_symbols(s):
    """Drop diacritics; every punctuation mark, symbol or other mark becomes a space."""
    s = unicodedata.normalize("NFKD", s)
    return "".join(" " if unicodedata.category(c)[0] in "MSP" else c for c in s if unicodedata.category(c) != "Mn")

def _numbers(words):
    """Spelled-out cardinals -> digits (the subset described at the top of the file)."""
    out, prefix, total, group, words_in, prev = [], "", 0, 0, [], None
    def flush():
        nonlocal prefix, total, group, words_in
        if words_in:
            out.append("one" if words_in == ["one"] and not prefix else prefix + str(total + group))
        prefix, total, group, words_in = "", 0, 0, []
    for k, w in enumerate(words):
        nxt = words[k + 1] if k + 1 < len(words) else None
        small = ONES.get(w, TENS.get(w))
        if small is not None:
            if not words_in or prev in MULTIPLIERS or prev == "and" or (prev in TENS and small < 10):
                group += small
            else:  # "nineteen ninety" -> "1990": a new number glued to the digits so far, as Whisper does
                prefix, total, group = prefix + str(total + group), 0, small
        elif w == "hundred" and (not words_in or 0 < group < 100):
            group = 100 * (group or 1)
        elif w in MULTIPLIERS and w != "hundred" and (not words_in or group or prev != w):
            total, group = total + MULTIPLIERS[w] * (group or (0 if total else 1)), 0
        elif w == "and" and words_in and prev in MULTIPLIERS and (nxt in ONES or nxt in TENS):
            pass  # "two hundred and five"
        else:
            flush()
            out.append(w)
            prev = w
            continue
        words_in.append(w)
        prev = w
    flush()
    return out

def normalize_en(text):
    s = text.lower().replace("\u2019", "'")
    s = re.sub(r"[<\[][^>\]]*[>\]]", "", s)  # [noise], <unk>
    s = re.sub(r"\(([^)]+?)\)", "", s)  # (laughs)
    s = re.sub(FILLERS, "", s)
    s = re.sub(r"\s+'", "'", s)  # "don 't" -> "don't"
    for pattern, replacement in CONTRACTIONS.items():
        s = re.sub(pattern, replacement, s)
    s = re.sub(r"(\d),(\d)", r"\1\2", s)
    s = _strip_symbols(s)
    return " ".join(_numbers(s.split()))

def normalize_zh(text):
    return "".join(c for c in unicodedata.normalize("NFKC", text.lower()) if unicodedata.category(c)[0] not in "PSZC")

def normalize_basic(text):
    """Other languages: lower-case, punctuation and symbols to spaces, whitespace collapsed."""
    return " ".join(_strip_symbols(text.lower()).split())

NORMALIZERS = {None: lambda s: s, "en": normalize_en, "zh": normalize_zh, "basic": normalize_basic}

# -----------------------------------------------------------------------------
# scorer

def units(text, unit="word"):
    """Split a string into scoring units exactly as jiwer's default transforms do."""
    if unit == "word":
        return [w for w in re.sub(r"\s\s+", " ", text).strip().split(" ") if w]
    if unit == "char":
        return list(text.strip())
    raise ValueError(f"unit must be 'word' or 'char', got {unit!r}")

def _edits(ref, hyp):
    """(S, D, I) of the alignment rapidfuzz.distance.Levenshtein.opcodes(ref, hyp) returns.
    Hyyro's bit-parallel Levenshtein: D[i][j] is the distance between ref[:i] and hyp[:j]; after hyp[:j] is read,
    bit i-1 of vp[j] (vn[j]) says D[i][j] - D[i-1][j] is +1 (-1). The walk back from (len(ref), len(hyp)) takes a
    deletion when D[i][j] = D[i-1][j] + 1, else steps to j-1 and takes an insertion if D[i][j-1] = D[i-1][j-1] - 1,
    else the diagonal (a substitution when the units differ). Ties broken this way give rapidfuzz's S/D/I split."""
    p = 0
    while p < len(ref) and p < len(hyp) and ref[p] == hyp[p]:
        p += 1
    q = 0
    while q < len(ref) - p and q < len(hyp) - p and ref[-1 - q] == hyp[-1 - q]:
        q += 1
    ref, hyp = ref[p:len(ref) - q], hyp[p:len(hyp) - q]
    if not ref or not hyp:
        return 0, len(ref), len(hyp)
    match = {}  # unit -> bitmask of its positions in ref
    for i, u in enumerate(ref):
        match[u] = match.get(u, 0) | (1 << i)
    VP, VN, vps, vns = (1 << len(ref)) - 1, 0, [], []
    for u in hyp:
        X = match.get(u, 0)
        D0 = (((X & VP) + VP) ^ VP) | X | VN
        HP = VN | ~(D0 | VP)
        HN = D0 & VP
        HP = (HP << 1) | 1
        HN = HN << 1
        VP = HN | ~(D0 | HP)
        VN = HP & D0
        vps.append(VP)
        vns.append(VN)
    s = d = ins = 0
    i, j = len(ref), len(hyp)
    while i and j:
        if vps[j - 1] >> (i - 1) & 1:
            d += 1
            i -= 1
        else:
            j -= 1
            if j and vns[j - 1] >> (i - 1) & 1:
                ins += 1
            else:
                i -= 1
                s += ref[i] != hyp[j]
    return s, d + i, ins + j

def score(refs, hyps, unit="word", normalize=None, per_utt=False):
    """Corpus-level error rate equal to jiwer.process_words (unit="word") / process_characters (unit="char") on the
    normalised strings. Returns {"wer", "n", "s", "d", "i"} (+ "utts": [(n, s, d, i)] with per_utt=True)."""
    if isinstance(refs, str):
        refs, hyps = [refs], [hyps]
    if len(refs) != len(hyps):
        raise ValueError(f"{len(refs)} references but {len(hyps)} hypotheses")
    if normalize not in NORMALIZERS:
        raise ValueError(f"normalize must be one of {list(NORMALIZERS)}, got {normalize!r}")
    norm = NORMALIZERS[normalize]
    N = S = D = I = 0
    utts = []
    for ref, hyp in zip(refs, hyps):
        r, h = units(norm(ref), unit), units(norm(hyp), unit)
        s, d, i = _edits(r, h)
        N, S, D, I = N + len(r), S + s, D + d, I + i
        if per_utt:
            utts.append((len(r), s, d, i))
    out = {"wer": (S + D + I) / N if N else float(I), "n": N, "s": S, "d": D, "i": I}
    if per_utt:
        out["utts"] = utts
    return out

# -----------------------------------------------------------------------------
# transcription

def _duration(row):
    if row.get("duration") is not None:
        return float(row["duration"])
    import soundfile as sf
    try:
        return sf.info(row["audio"]).duration
    except Exception:
        return 0.0  # unknown: load_audio will name the problem

def transcribe(model, tokenizer, rows, batch_size=16, beam=1, language=None, n_frames=None, max_new_tokens=None):
    """Decode every row's audio (greedy, or beam search with beam > 1); returns the texts in the order of rows.
    Rows are batched by prompt (language) and sorted by duration; mels are padded like data.Batches does.
    Whisper weights (n_audio_ctx 1500 + a Whisper tokenizer) always get Whisper's 30-s window (n_frames=3000)."""
    import torch
    import data
    if n_frames is None and model.dims.n_audio_ctx == 1500 and tokenizer.to_dict().get("kind") == "whisper":
        n_frames = data.N_FRAMES
    if max_new_tokens is None:
        max_new_tokens = model.dims.n_text_ctx // 2  # Whisper's sample_len
    device = next(model.parameters()).device
    n_mels = model.dims.n_mels
    prompts = [tuple(tokenizer.sot_sequence(language or row.get("lang"))) for row in rows]
    order = sorted(range(len(rows)), key=lambda k: (prompts[k], _duration(rows[k])))
    texts = [None] * len(rows)
    was_training = model.training
    model.eval()
    batches = []
    for k in order:  # a new batch where it is full or where the prompt changes
        if batches and len(batches[-1]) < batch_size and prompts[batches[-1][0]] == prompts[k]:
            batches[-1].append(k)
        else:
            batches.append([k])
    for idx in batches:
        mels = []
        for k in idx:
            audio = data.load_audio(rows[k]["audio"])
            if n_frames == data.N_FRAMES:
                mels.append((data.whisper_mel(audio, n_mels), 0.0))
            else:
                m, pad, _ = data.utterance_mel(audio, n_mels, n_frames)
                mels.append((m, pad))
        T = n_frames or max(m.shape[1] for m, _ in mels)
        T = min(T, model.dims.n_audio_ctx * getattr(model.dims, "conv_stride", 2))  # the encoder's longest input
        mel = torch.empty(len(idx), n_mels, T)
        for b, (m, pad) in enumerate(mels):
            mel[b].fill_(pad)
            mel[b, :, :min(T, m.shape[1])] = m[:, :T]
        with torch.no_grad():
            xa = model.encoder(mel.to(device))
            kw = dict(max_new_tokens=max_new_tokens, suppress=tokenizer.suppress, suppress_blank=tokenizer.suppress_blank)
            if beam > 1:
                tokens, _, _ = model.beam_search(xa, list(prompts[idx[0]]), tokenizer.eot, beam_size=beam, **kw)
            else:
                tokens, _, _ = model.generate(xa, list(prompts[idx[0]]), tokenizer.eot, **kw)
        for k, t in zip(idx, tokens):
            texts[k] = tokenizer.decode(t).strip()
    model.train(was_training)
    return texts

# -----------------------------------------------------------------------------
# checkpoints and the command line

def is_our_checkpoint(ckpt):
    return isinstance(ckpt, dict) and "model_args" in ckpt and "tokenizer" in ckpt

def model_from_checkpoint(ckpt):
    """Our checkpoint dict (already loaded) -> (model, tokenizer)."""
    import data
    from model import Whisper, ModelDimensions
    model = Whisper(ModelDimensions(**ckpt["model_args"]))
    state = {k.removeprefix("_orig_mod.").removeprefix("module."): v for k, v in ckpt["model"].items()}
    model.load_state_dict(state)
    return model, data.tokenizer_from_dict(ckpt["tokenizer"])

def load_checkpoint(path, device="cpu"):
    """Our training checkpoint {model, model_args, tokenizer, ...} or any Whisper format (teacher.load_whisper)."""
    import torch
    if not os.path.exists(path):
        raise ValueError(f"{path}: checkpoint not found")
    if os.path.isfile(path):
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
        if is_our_checkpoint(ckpt):
            model, tokenizer = model_from_checkpoint(ckpt)
            return model.to(device).eval(), tokenizer
    from teacher import load_whisper
    model, tokenizer = load_whisper(path)
    return model.to(device).eval(), tokenizer

def report(rows, hyps, wall, language=None):
    """Score the labelled rows; returns the results dict that --out writes."""
    labelled = [k for k, row in enumerate(rows) if row.get("text") is not None]
    langs = [language or rows[k].get("lang") or "en" for k in labelled]
    lang = max(set(langs), key=langs.count) if langs else (language or "en")
    unit, normalize = ("char", "zh") if lang.startswith("zh") else ("word", "en" if lang.startswith("en") else "basic")
    res = score([rows[k]["text"] for k in labelled], [hyps[k] for k in labelled], unit, normalize, per_utt=True)
    errors = {k: s + d + i for k, (n, s, d, i) in zip(labelled, res["utts"])}
    utt_rates = [(s + d + i) / n for n, s, d, i in res["utts"] if n]
    audio_seconds = sum(_duration(row) for row in rows)
    return {
        "metric": "cer" if unit == "char" else "wer", "language": lang, "normalizer": normalize,
        "wer": res["wer"], "n": res["n"], "s": res["s"], "d": res["d"], "i": res["i"],
        "utterances": len(rows), "scored": len(labelled), "audio_seconds": audio_seconds,
        "rtfx": audio_seconds / max(wall, 1e-9), "median_utt_wer": float(np.median(utt_rates)) if utt_rates else None,
        "utts": [{"audio": row["audio"], "ref": row.get("text"), "hyp": hyp, "errors": errors.get(k)}
                 for k, (row, hyp) in enumerate(zip(rows, hyps))],
    }

def main():
    ckpt = ""  # our checkpoint .pt, or Whisper weights (.pt / Hugging Face dir / CTranslate2 dir)
    manifest = ""  # JSONL: {"audio", "text" (optional), "lang" (optional), "duration" (optional)}
    beam = 1  # 1 = greedy
    out = ""  # write the results as JSON here
    language = ""  # overrides each row's "lang": prompt language and metric (zh -> CER)
    batch_size = 16
    max_utts = 0  # 0 = all
    device = ""  # default: cuda if available
    g = dict(locals())  # configurator.py overrides these from --key=value
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read(), g)
    import torch
    import data
    device = g["device"] or ("cuda" if torch.cuda.is_available() else "cpu")
    if not g["ckpt"] or not g["manifest"]:
        raise ValueError("give --ckpt=PATH and --manifest=PATH")
    rows = data.read_manifest(g["manifest"])
    if g["max_utts"]:
        rows = rows[:g["max_utts"]]
    model, tokenizer = load_checkpoint(g["ckpt"], device)
    t0 = time.time()
    hyps = transcribe(model, tokenizer, rows, g["batch_size"], g["beam"], g["language"] or None)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    res = report(rows, hyps, time.time() - t0, g["language"] or None)
    name = res["metric"].upper()
    print(f"{'':>2}{name:>7} {'N':>8} {'S':>7} {'D':>7} {'I':>7} {'utts':>6} {'scored':>6} {'audio_s':>9} {'RTFx':>8} {'med_utt':>8}")
    med = "-" if res["median_utt_wer"] is None else f"{100 * res['median_utt_wer']:.2f}"
    print(f"{'':>2}{100 * res['wer']:6.2f}% {res['n']:>8} {res['s']:>7} {res['d']:>7} {res['i']:>7} {res['utterances']:>6} "
          f"{res['scored']:>6} {res['audio_seconds']:>9.1f} {res['rtfx']:>8.1f} {med:>8}")
    if res["scored"] < res["utterances"]:
        print(f"scored {res['scored']} of {res['utterances']} utterances (the others have no text)")
    if g["out"]:
        with open(g["out"] + ".tmp", "w", encoding="utf-8") as f:
            json.dump(res, f, ensure_ascii=False, indent=1)
        os.replace(g["out"] + ".tmp", g["out"])
        print(f"wrote {g['out']}")

if __name__ == "__main__":
    try:
        main()
    except (OSError, ValueError, ImportError) as e:
        print(f"evaluate.py: error: {e}", file=sys.stderr)
        sys.exit(1)
