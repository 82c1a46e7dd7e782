"""
Small benchmarks, one mode per component:

    python bench.py scorer    # evaluate.score vs jiwer on the same reference/hypothesis pairs
"""
import random
import sys
import time

def _best_of(fn, repeat=5):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out

def bench_scorer(n=2000, seed=0):
    """Corpus-level scoring of n pairs shaped like test sets (LibriSpeech-like ~20 words, AISHELL-like ~15 characters,
    ~10% of units edited), ours vs jiwer (its Levenshtein is rapidfuzz's C++), side by side, same pairs, same process."""
    import jiwer
    from evaluate import score
    rng = random.Random(seed)
    vocab = [f"w{k}" for k in range(2000)]
    hanzi = [chr(0x4e00 + k) for k in range(3000)]
    def corrupt(units):
        out = []
        for u in units:
            r = rng.random()
            if r < 0.04:
                out.append(rng.choice(units))  # substitution
            elif r < 0.07:
                continue  # deletion
            else:
                out.append(u)
            if rng.random() < 0.03:
                out.append(rng.choice(units))  # insertion
        return out
    sets = {}
    for name, alphabet, joiner, length in (("word", vocab, " ", 20), ("char", hanzi, "", 15), ("word_long", vocab, " ", 80)):
        refs, hyps = [], []
        for _ in range(n):
            ref = [rng.choice(alphabet) for _ in range(max(1, int(rng.gauss(length, length / 3))))]
            refs.append(joiner.join(ref))
            hyps.append(joiner.join(corrupt(ref)))
        sets[name] = refs, hyps
    print(f"{'pairs':<22} {'ours (ms)':>10} {'jiwer (ms)':>11} {'jiwer/ours':>11}   rate (equal)")
    for name, (refs, hyps) in sets.items():
        unit = "char" if name == "char" else "word"
        t_ours, ours = _best_of(lambda: score(refs, hyps, unit))
        jiwer_fn = jiwer.process_characters if unit == "char" else jiwer.process_words
        t_jiwer, theirs = _best_of(lambda: jiwer_fn(refs, hyps))
        rate = theirs.cer if unit == "char" else theirs.wer
        same = ours["wer"] == rate and (ours["s"], ours["d"], ours["i"]) == (theirs.substitutions, theirs.deletions, theirs.insertions)
        print(f"{n} x {name:<16} {1e3 * t_ours:>10.1f} {1e3 * t_jiwer:>11.1f} {t_jiwer / t_ours:>10.2f}x   "
              f"{100 * ours['wer']:.3f}% ({same})")

MODES = {
    "scorer": bench_scorer,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        print(f"usage: python bench.py {{{'|'.join(MODES)}}}", file=sys.stderr)
        sys.exit(2)
    MODES[sys.argv[1]]()
