"""
Corpus-level WER / CER with jiwer's exact numbers, and the text normalisers.

score gives exactly jiwer's numbers (process_words / process_characters; tests/test_scorer.py):
(S + D + I) / N over the whole corpus, not a mean of per-utterance rates (N == 0: the number of
insertions, as jiwer); words split like jiwer's wer_default (runs of 2+ whitespace characters become
one space, the ends are stripped, then split on " "), characters like cer_default (inner spaces are
units); S/D/I is the split rapidfuzz's Levenshtein.opcodes picks among equal-cost alignments
(_edits), except in huge pairs (~2,000 x 2,000 units and up: rapidfuzz's Hirschberg algorithm).
The normalisers (normalize_en, normalize_zh, normalize_basic) apply to reference and hypothesis.
"""
import os
import re
import unicodedata

# -----------------------------------------------------------------------------
# normalisers

FILLERS = r"\b(hmm|mm|mhm|mmm|uh|um)\b"
CONTRACTIONS = {  # applied in this order, after lower-casing (openai-whisper's list)
    r"\bwon't\b": "will not", r"\bcan't\b": "can not", r"\blet's\b": "let us",
    r"\bain't\b": "aint", r"\by'all\b": "you all", r"\bwanna\b": "want to", r"\bgotta\b": "got to",
    r"\bgonna\b": "going to", r"\bi'ma\b": "i am going to", r"\bimma\b": "i am going to",
    r"\bwoulda\b": "would have", r"\bcoulda\b": "could have", r"\bshoulda\b": "should have",
    r"\bma'am\b": "madam", r"\bmr\b": "mister ", r"\bmrs\b": "missus ", r"\bst\b": "saint ",
    r"\bdr\b": "doctor ", r"\bprof\b": "professor ", r"\bcapt\b": "captain ",
    r"\bgov\b": "governor ", r"\bald\b": "alderman ", r"\bgen\b": "general ",
    r"\bsen\b": "senator ", r"\brep\b": "representative ", r"\bpres\b": "president ",
    r"\brev\b": "reverend ", r"\bhon\b": "honorable ", r"\basst\b": "assistant ",
    r"\bassoc\b": "associate ", r"\blt\b": "lieutenant ", r"\bcol\b": "colonel ",
    r"\bjr\b": "junior ", r"\bsr\b": "senior ", r"\besq\b": "esquire ",
    r"'d been\b": " had been", r"'s been\b": " has been", r"'d gone\b": " had gone",
    r"'s gone\b": " has gone", r"'d done\b": " had done", r"'s got\b": " has got",
    r"n't\b": " not", r"'re\b": " are", r"'s\b": " is", r"'d\b": " would", r"'ll\b": " will",
    r"'t\b": " not", r"'ve\b": " have", r"'m\b": " am",
}
ONES = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven "
                                   "twelve thirteen fourteen fifteen sixteen seventeen eighteen "
                                   "nineteen".split())}
TENS = {w: 10 * i for i, w in
        enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), 2)}
MULTIPLIERS = {"hundred": 100, "thousand": 1_000, "million": 1_000_000, "billion": 1_000_000_000}

def _strip_symbols(s):
    """Drop diacritics; every punctuation mark, symbol or other mark becomes a space."""
    cat = unicodedata.category
    return "".join(" " if cat(c)[0] in "MSP" else c for c in unicodedata.normalize("NFKD", s)
                   if cat(c) != "Mn")

def _numbers(words):
    """Spelled-out cardinals -> digits: "twenty-one" -> "21", "two hundred and five" -> "205";
    adjacent numbers concatenate like Whisper's ("nineteen ninety nine" -> "1999"); a lone "one"
    stays a word ("one of them")."""
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
            if not words_in or prev in MULTIPLIERS or prev == "and" or prev in TENS and small < 10:
                group += small
            else:  # "nineteen ninety" -> "1990": a new number glued to the digits so far (Whisper)
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
    """A subset of openai-whisper's EnglishTextNormalizer: lower-case; drop [bracketed], <tagged>
    and (parenthesised) spans and the FILLERS; expand the CONTRACTIONS and titles (like Whisper,
    "john's" becomes "john is": harmless, both sides get it); drop diacritics and commas between
    digits; other punctuation and symbols become spaces; spelled-out cardinals become digits.
    Not done: ordinals, decimals, currency, percent, "a half", British -> American spellings, and
    keeping "." / "$" / "%" inside numbers."""
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
    """Lower-case; drop whitespace, punctuation and symbols (Unicode P*, S*, Z*, C*); per char."""
    s = unicodedata.normalize("NFKC", text.lower())
    return "".join(c for c in s if unicodedata.category(c)[0] not in "PSZC")

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
    The common prefix and suffix are stripped, then Hyyro's bit-parallel Levenshtein: D[i][j] is
    the distance between ref[:i] and hyp[:j]; after hyp[:j] is read, bit i-1 of vp[j] (vn[j]) says
    D[i][j] - D[i-1][j] is +1 (-1). The walk back from (len(ref), len(hyp)) takes a deletion when
    D[i][j] = D[i-1][j] + 1, else steps to j-1 and takes an insertion if
    D[i][j-1] = D[i-1][j-1] - 1, else the diagonal (a substitution when the units differ).
    Ties broken this way give rapidfuzz's S/D/I split."""
    p = len(os.path.commonprefix([ref, hyp]))  # works on lists: the common leading units
    q = len(os.path.commonprefix([ref[p:][::-1], hyp[p:][::-1]]))
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
        HP, HN = VN | ~(D0 | VP), D0 & VP
        HP, HN = (HP << 1) | 1, HN << 1
        VP, VN = HN | ~(D0 | HP), HP & D0
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
    """Corpus-level error rate equal to jiwer.process_words (unit="word") / process_characters
    (unit="char") on the normalised strings. Returns {"wer", "n", "s", "d", "i"}
    (+ "utts": [(n, s, d, i)] with per_utt=True)."""
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

