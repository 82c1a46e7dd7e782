"""score.score against jiwer (reference implementation, test-only), and the normalisers."""
import random

import pytest

jiwer = pytest.importorskip("jiwer")

from score import score, normalize_en, normalize_zh, normalize_basic, units

VOCAB = "a an the cat cats sat on mat dog dogs ran to of".split()
HANZI = list("我你他的是在不了有和人这中大为上个国")

def _pairs(n=1200, seed=0):
    """English word strings and Chinese character strings of many lengths (up to 200 characters,
    beyond rapidfuzz's 64-unit single-word fast path), with empty strings on either side, messy
    spacing and near-copies (many ties)."""
    rng = random.Random(seed)
    def en():
        words = [rng.choice(VOCAB) for _ in range(rng.choice([0, 0, 1, 2, 3, 5, 8, 13, 30, 70]))]
        if rng.random() < 0.9:
            return rng.choice([" ", "  ", " "]).join(words)
        return " " + "   ".join(words) + " "
    def zh():
        alphabet = HANZI[:rng.randint(1, len(HANZI))]  # small alphabets: many equal-cost alignments
        s = "".join(rng.choice(alphabet) for _ in range(rng.choice([0, 0, 1, 3, 10, 30, 80, 200])))
        return s if rng.random() < 0.8 else s[:len(s) // 2] + " " + s[len(s) // 2:]
    pairs = []
    for k in range(n):
        make = en if k % 2 else zh
        ref, hyp = make(), make()
        if rng.random() < 0.4:  # a few edits of the reference
            h = ref.split(" ") if make is en else list(ref)
            for _ in range(rng.randint(0, 4)):
                op = rng.randrange(3)
                if op == 0 and h:
                    h[rng.randrange(len(h))] = rng.choice(h)
                elif op == 1 and h:
                    del h[rng.randrange(len(h))]
                else:
                    h.insert(rng.randint(0, len(h)), rng.choice(VOCAB if make is en else HANZI))
            hyp = (" " if make is en else "").join(h)
        pairs.append((ref, hyp))
    return pairs

def _jiwer(refs, hyps, unit):
    if unit == "word":
        o = jiwer.process_words(refs, hyps)
        return o.wer, o.substitutions, o.deletions, o.insertions, o.hits
    o = jiwer.process_characters(refs, hyps)
    return o.cer, o.substitutions, o.deletions, o.insertions, o.hits

@pytest.mark.parametrize("unit", ["word", "char"])
def test_per_pair_equals_jiwer(unit):
    for ref, hyp in _pairs():
        rate, s, d, i, h = _jiwer(ref, hyp, unit)
        ours = score(ref, hyp, unit)
        assert (ours["s"], ours["d"], ours["i"]) == (s, d, i), (unit, ref, hyp)
        assert ours["n"] == h + s + d
        assert abs(ours["wer"] - rate) <= 1e-12

@pytest.mark.parametrize("unit", ["word", "char"])
def test_corpus_equals_jiwer(unit):
    pairs = _pairs(seed=1)
    refs, hyps = [r for r, _ in pairs], [h for _, h in pairs]
    rate, s, d, i, h = _jiwer(refs, hyps, unit)
    ours = score(refs, hyps, unit, per_utt=True)
    assert (ours["s"], ours["d"], ours["i"], ours["n"]) == (s, d, i, h + s + d)
    assert abs(ours["wer"] - rate) <= 1e-12
    assert abs(ours["wer"] - (jiwer.wer if unit == "word" else jiwer.cer)(refs, hyps)) <= 1e-12
    assert [tuple(sum(x) for x in zip(*ours["utts"]))] == [(ours["n"], s, d, i)]

def test_normalised_corpus_equals_jiwer_on_normalised_text():
    pairs = _pairs(300, seed=2)
    for unit, norm, f in (("word", "en", normalize_en), ("char", "zh", normalize_zh)):
        refs, hyps = [f(r) for r, _ in pairs], [f(h) for _, h in pairs]
        rate, s, d, i, _ = _jiwer(refs, hyps, unit)
        ours = score([r for r, _ in pairs], [h for _, h in pairs], unit, norm)
        assert (ours["s"], ours["d"], ours["i"]) == (s, d, i) and abs(ours["wer"] - rate) <= 1e-12

def test_ties_and_edge_cases():
    # equal-cost alignments: jiwer (rapidfuzz) prefers these splits; a textbook backtrace may not
    for ref, hyp in [("a b", "b c"), ("a b c", "c a b"), ("a a b", "b a"), ("x y z", "y"),
                     ("a b c d", "b a d c"), ("", "a b")]:
        o = jiwer.process_words(ref, hyp)
        ours = score(ref, hyp)
        want = (o.substitutions, o.deletions, o.insertions)
        assert (ours["s"], ours["d"], ours["i"]) == want, (ref, hyp)
    # empty references: jiwer's "rate" is then the number of insertions; empty hypotheses: all
    # deletions
    assert score(["", ""], ["a b", "c"]) == {"wer": 3.0, "n": 0, "s": 0, "d": 0, "i": 3}
    assert jiwer.wer(["", ""], ["a b", "c"]) == 3
    assert score(["", ""], ["", " "])["wer"] == 0.0 == jiwer.wer(["", ""], ["", " "])
    assert score("a b c", "") == {"wer": 1.0, "n": 3, "s": 0, "d": 3, "i": 0}
    assert score(["", "a b"], ["x", "a b"])["wer"] == 0.5 == jiwer.wer(["", "a b"], ["x", "a b"])
    # char units keep inner spaces (jiwer.cer's default) but not the ends
    assert units(" a  b ", "char") == ["a", " ", " ", "b"]
    assert score("ab cd", "abcd", "char")["d"] == 1 and jiwer.cer("ab cd", "abcd") == 0.2
    # word units: only runs of 2+ whitespace characters collapse (a single tab stays inside a
    # word, as in jiwer)
    assert units("a\tb  c\n\nd", "word") == ["a\tb", "c", "d"]
    with pytest.raises(ValueError):
        score(["a"], ["a", "b"])

def test_normalize_en_examples():
    cases = {
        "Hello, World!  Foo-bar": "hello world foo bar",
        "He won't go; she can't, they're here and I'm not.":
            "he will not go she can not they are here and i am not",
        "We'll see what you've done, I'd say.": "we will see what you have done i would say",
        "It's OK, isn't it?": "it is ok is not it",
        "twenty one people and three dogs": "21 people and 3 dogs",
        "Ninety-nine bottles": "99 bottles",
        "five thousand three hundred and two": "5302",
        "nineteen ninety nine": "1999",
        "one of them, one": "one of them one",
        "one two three": "123",
        "The year 1,000": "the year 1000",
        "[noise] uh hi (laughs) um <unk>": "hi",
        "Mr. Smith and Dr. Jones": "mister smith and doctor jones",
        "Café  déjà vu": "cafe deja vu",
        "It\u2019s ten o'clock": "it is 10 o clock",
        "": "",
    }
    for text, want in cases.items():
        assert normalize_en(text) == want, text

def test_normalize_en_agrees_with_whisper_on_simple_sentences():
    normalizers = pytest.importorskip("whisper.normalizers")
    whisper_norm = normalizers.EnglishTextNormalizer()
    sentences = [
        "Hello, World!", "John's car isn't red.", "He's gone, she'd go; I'm here. We'll see!",
        "twenty one people and three dogs", "one hundred and five", "I won't, can't",
        "two thousand twenty", "nineteen ninety nine", "Mr. Smith met Dr. Jones",
        "five thousand three hundred", "seven eleven", "twenty twenty one", "he was one",
        "a hundred", "one million two thousand and three", "They've been here, you're there",
        "Café au lait", "We gotta go, wanna come?", "fifteen minutes", "three hundred thousand",
        "zero", "forty two and six", "Let's go, y'all!", "twelve hundred", "THE CAT SAT ON THE MAT",
        "A man said to the universe: Sir, I exist!",
    ]
    for s in sentences:
        assert normalize_en(s) == whisper_norm(s).strip(), s

def test_normalize_zh_and_basic():
    text = "你好，世界！ 我 爱 北京。“引号”（括号）《书》、；：？"
    assert normalize_zh(text) == "你好世界我爱北京引号括号书"
    assert normalize_zh("Hello  World. ２０２４年") == "helloworld2024年"
    r = score("今天 天气 很好。", "今天天气很 好！", "char", "zh")
    assert r == {"wer": 0.0, "n": 6, "s": 0, "d": 0, "i": 0}
    assert score("我爱北京", "我爱南京", "char", "zh")["s"] == 1
    assert normalize_basic("Guten Tag, Welt!  Ça va?") == "guten tag welt ca va"
