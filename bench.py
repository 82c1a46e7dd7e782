"""
Small benchmarks, one mode per component:

    python bench.py scorer    # evaluate.score vs jiwer on the same reference/hypothesis pairs
    python bench.py whisper   # greedy RTFx and peak memory: ours vs faster-whisper, tiny.en and base, CPU fp32, 2 threads
    python bench.py opd       # one OPD step vs one supervised step of the same student and batch (distill.bench_opd)
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

def _whisper_worker(impl, model_dir, wav_dir):
    """Runs in its own process so that its peak RSS is its own: transcribe every wav once (after one warm-up)."""
    import glob, resource, torch
    torch.set_num_threads(2)
    import data
    wavs = sorted(glob.glob(f"{wav_dir}/*.wav"))
    audios = [data.load_audio(w) for w in wavs]
    if impl == "ours":
        from teacher import load_whisper
        model, tok = load_whisper(model_dir)
        model.eval()
        def run(audio):
            with torch.no_grad():
                xa = model.encoder(data.whisper_mel(audio, model.dims.n_mels)[None])
                tokens, _, _ = model.generate(xa, tok.sot_sequence("en"), tok.eot, max_new_tokens=224,
                                              suppress=tok.suppress, suppress_blank=tok.suppress_blank)
            return tok.decode(tokens[0])
    else:
        from faster_whisper import WhisperModel
        fw = WhisperModel(model_dir, device="cpu", compute_type="float32", cpu_threads=2)
        def run(audio):
            segments, _ = fw.transcribe(audio, language="en", beam_size=1, temperature=0.0, vad_filter=False,
                                        condition_on_previous_text=False, without_timestamps=True)
            return "".join(s.text for s in segments)
    run(audios[0])  # warm-up: the first call is slow
    t0 = time.perf_counter()
    for audio in audios:
        run(audio)
    wall = time.perf_counter() - t0
    seconds = sum(len(a) for a in audios) / data.SAMPLE_RATE
    print(f"{seconds / wall} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}")

def bench_whisper(n=12):
    """Greedy decoding speed (RTFx = audio seconds / wall seconds) of our model vs faster-whisper on the same espeak-ng
    clips, both CPU fp32 with 2 threads, each in a fresh process (peak RSS in MiB), one after the other in one run."""
    import os, subprocess, tempfile
    from teacher import assemble_weights
    assemble_weights("weights")
    wav_dir = tempfile.mkdtemp()
    rng = random.Random(0)
    words = "the quick brown fox jumps over a lazy dog while seven red birds sing near old green houses".split()
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(6, 16)))
        subprocess.run(["espeak-ng", "-v", ["en-us", "en", "en+f3"][i % 3], "-w", f"{wav_dir}/{i:02d}.wav", text], check=True)
    print(f"{'model':<8} {'ours RTFx':>10} {'fw RTFx':>9} {'ours/fw':>8} {'ours MiB':>9} {'fw MiB':>8}")
    for name in ("tiny.en", "base"):
        res = {}
        for impl in ("ours", "fw"):
            out = subprocess.run([sys.executable, "-c", f"import bench; bench._whisper_worker({impl!r}, 'weights/{name}', {wav_dir!r})"],
                                 capture_output=True, text=True, check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
            res[impl] = [float(x) for x in out.stdout.split()[-2:]]
        print(f"{name:<8} {res['ours'][0]:>10.1f} {res['fw'][0]:>9.1f} {res['ours'][0] / res['fw'][0]:>7.2f}x "
              f"{res['ours'][1]:>9.0f} {res['fw'][1]:>8.0f}")

def bench_opd():
    from distill import bench_opd
    bench_opd()

MODES = {
    "scorer": bench_scorer,
    "whisper": bench_whisper,
    "opd": bench_opd,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in MODES:
        print(f"usage: python bench.py {{{'|'.join(MODES)}}}", file=sys.stderr)
        sys.exit(2)
    MODES[sys.argv[1]]()
