r"""
Small benchmarks, one mode per component; every figure is a ratio measured side by side in one run:

    python bench.py scorer    # score.score vs jiwer on the same reference/hypothesis pairs
    python bench.py whisper   # greedy RTFx, peak RSS: ours vs faster-whisper, CPU fp32, 2 threads
    python bench.py opd       # one OPD step vs one supervised step of the same student and batch
    python bench.py opd --init_from=out/demo/base/ckpt.pt --manifest=out/demo/unlabeled.jsonl \
        --batch_size=16
    python bench.py versus --ckpt=out/long_opd/ckpt.pt --ref=weights/tiny.en \
        --manifest=data/synth_piper/test.jsonl   # two models' WER and greedy speed, same clips
"""
import os
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
    """Corpus-level scoring, ours vs jiwer (rapidfuzz's C++ Levenshtein), same process, same n pairs
    shaped like test sets: LibriSpeech-like ~20 words, AISHELL-like ~15 characters, ~10% edited."""
    import jiwer
    from score import score
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
    shapes = (("word", vocab, " ", 20), ("char", hanzi, "", 15), ("word_long", vocab, " ", 80))
    for name, alphabet, joiner, length in shapes:
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
        edits = (theirs.substitutions, theirs.deletions, theirs.insertions)
        same = ours["wer"] == rate and (ours["s"], ours["d"], ours["i"]) == edits
        print(f"{n} x {name:<16} {1e3 * t_ours:>10.1f} {1e3 * t_jiwer:>11.1f} "
              f"{t_jiwer / t_ours:>10.2f}x   {100 * ours['wer']:.3f}% ({same})")

def _whisper_worker(impl, model_dir, wav_dir):
    """Transcribe every wav once after a warm-up; runs in its own process so peak RSS is its own."""
    import glob, resource, torch
    torch.set_num_threads(2)
    import data
    wavs = sorted(glob.glob(f"{wav_dir}/*.wav"))
    audios = [data.load_audio(w) for w in wavs]
    if impl == "ours":
        from checkpoint import load_whisper
        from decoding import generate
        model, tok = load_whisper(model_dir)
        model.eval()
        def run(audio):
            with torch.no_grad():
                xa = model.encoder(data.whisper_mel(audio, model.dims.n_mels)[None])
                out = generate(model, xa, tok.sot_sequence("en"), tok.eot, max_new_tokens=224,
                               suppress=tok.suppress, suppress_blank=tok.suppress_blank)
            return tok.decode(out.tokens[0])
    else:
        from faster_whisper import WhisperModel
        fw = WhisperModel(model_dir, device="cpu", compute_type="float32", cpu_threads=2)
        def run(audio):
            segments, _ = fw.transcribe(audio, language="en", beam_size=1, temperature=0.0,
                                        vad_filter=False, condition_on_previous_text=False,
                                        without_timestamps=True)
            return "".join(s.text for s in segments)
    run(audios[0])  # warm-up: the first call is slow
    t0 = time.perf_counter()
    for audio in audios:
        run(audio)
    wall = time.perf_counter() - t0
    seconds = sum(len(a) for a in audios) / data.SAMPLE_RATE
    print(f"{seconds / wall} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}")

def bench_whisper(n=12):
    """Greedy RTFx (audio s / wall s) and peak RSS (MiB), ours vs faster-whisper on the same
    espeak-ng clips, CPU fp32, 2 threads, each in a fresh process, one after the other."""
    import os, subprocess, tempfile
    from checkpoint import assemble_weights
    assemble_weights("weights")
    wav_dir = tempfile.mkdtemp()
    rng = random.Random(0)
    words = ("the quick brown fox jumps over a lazy dog "
             "while seven red birds sing near old green houses").split()
    for i in range(n):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(6, 16)))
        voice = ["en-us", "en", "en+f3"][i % 3]
        subprocess.run(["espeak-ng", "-v", voice, "-w", f"{wav_dir}/{i:02d}.wav", text], check=True)
    print(f"{'model':<8} {'ours RTFx':>10} {'fw RTFx':>9} {'ours/fw':>8} "
          f"{'ours MiB':>9} {'fw MiB':>8}")
    here = os.path.dirname(os.path.abspath(__file__))
    for name in ("tiny.en", "base"):
        res = {}
        for impl in ("ours", "fw"):
            code = f"import bench; bench._whisper_worker({impl!r}, 'weights/{name}', {wav_dir!r})"
            out = subprocess.run([sys.executable, "-c", code],
                                 capture_output=True, text=True, check=True, cwd=here)
            res[impl] = [float(x) for x in out.stdout.split()[-2:]]
        ours, fw = res['ours'], res['fw']
        print(f"{name:<8} {ours[0]:>10.1f} {fw[0]:>9.1f} {ours[0] / fw[0]:>7.2f}x "
              f"{ours[1]:>9.0f} {fw[1]:>8.0f}")

def bench_opd(teacher_path='weights/base', manifest='data/synth_grammar/train.jsonl', batch_size=8,
              repeat=3, init_from='teacher', device='cpu'):
    """One OPD step (distill.opd_step + update) vs one SFT step (cross-entropy on the labels), same
    student and batch, shared frozen encoder run once, only decoder layers trained (embeddings
    frozen, as in the demo): ms/step, ratio and OPD breakdown, with and without the rollout length
    bound; on CPU also in float32 against a float32 SFT step, and the rollout alone with its bf16
    keys/values and projection copy (the default under cpu_bf16) against float32."""
    import dataclasses
    import torch
    import torch.nn.functional as F
    import common
    import data
    import distill
    import evaluate
    from checkpoint import load_checkpoint
    from student import make_student
    teacher, tok, _ = load_checkpoint(teacher_path, device)
    teacher.requires_grad_(False)
    if init_from == 'teacher':
        student = make_student(teacher, n_decoder_layers=2)
    else:
        student = load_checkpoint(init_from)[0]
    student.encoder.requires_grad_(False)
    student.decoder.token_embedding.requires_grad_(False)
    student.decoder.positional_embedding.requires_grad_(False)
    student.to(device).train()
    rows = data.read_manifest(manifest)[:batch_size]
    n_frames = evaluate.whisper_frames(teacher, tok)
    batch = data.Batches(rows, tok, batch_size=batch_size, n_frames=n_frames,
                         shuffle=False).collate(list(range(len(rows))))
    prompts = [tok.sot_sequence(r.get('lang')) for r in rows]
    t0 = distill.now(torch.device(device))
    with torch.no_grad():
        xa = teacher.encoder(batch['mel'].to(device))
    t_enc = distill.now(torch.device(device)) - t0
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    rescore = distill.Rescore(student)
    def update(total, n):
        (total / n.clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    bf16 = common.cpu_bf16_ok(device_type='cuda' if device.startswith('cuda') else 'cpu')
    def sft(bf16=bf16):
        tokens, targets = batch['tokens'].to(device), batch['targets'].to(device)
        with common.autocast(device, 'bfloat16', bf16):
            logits = rescore(tokens, xa)
        mask = targets != -100
        update(F.cross_entropy(logits[mask].float(), targets[mask], reduction='sum'), mask.sum())
        return {}
    hp = distill.Step(cpu_bf16=bf16)  # topk_union, k = 32, greedy; bf16 where the CPU has kernels
    S = distill.Side(student, tok, xa, None, prompts)
    T = distill.Side(teacher, tok, xa, None, prompts)
    bounds = distill.length_bounds(batch['duration'].tolist())
    def opd(hp=hp, bounds=bounds):
        total, n, stats = distill.opd_step(S, T, rescore, bounds, hp)
        update(total, n)
        return stats
    def rollout(bf16_copy):  # the rollout alone: bf16 K/V and projection copy, or float32
        t0 = distill.now(torch.device(device))
        distill.rollout(student, tok, xa, prompts, bounds,
                        dataclasses.replace(hp, cpu_bf16=bf16_copy), hp.topk)
        return {'t_rollout': distill.now(torch.device(device)) - t0, 't_teacher': 0.0}
    runs = {'sft': sft, 'sft_fp32': lambda: sft(False), 'opd': opd,
            'opd_unbounded': lambda: opd(bounds=[10 ** 6] * len(rows)),
            'opd_fp32': lambda: opd(dataclasses.replace(hp, cpu_bf16=False)),
            'rollout_fp32': lambda: rollout(False)}
    if bf16:  # the rollout's bf16 keys/values and projection copy, where bf16 pays at all
        runs['rollout_bf16'] = lambda: rollout(True)
    res = {}
    for name, fn in runs.items():
        fn()  # warm-up (allocations, AdamW state)
        best = None
        for _ in range(repeat):
            t0 = distill.now(torch.device(device))
            stats = fn()
            dt = distill.now(torch.device(device)) - t0
            if best is None or dt < best[0]:
                best = (dt, stats)
        res[name] = best
    t_sft, t_sft32 = res['sft'][0], res['sft_fp32'][0]
    n_student, n_teacher = student.get_num_params() / 1e6, teacher.get_num_params() / 1e6
    n_trained = sum(p.numel() for p in params) / 1e6
    print(f"batch of {len(rows)} utterances ({batch['duration'].sum():.1f} s of audio), student "
          f"{n_student:.1f}M ({n_trained:.1f}M trained), teacher {n_teacher:.1f}M; "
          f"encoder {1000 * t_enc / len(rows):.0f} ms/utt (once)")
    print(f"{'step':<17} {'ms':>8} {'x sft':>6} {'rollout':>8} {'teacher':>8} {'update':>8} "
          f"{'tokens/utt':>10} {'ended':>6}")
    print(f"{'sft':<17} {1000 * t_sft:8.0f} {1.0:6.2f}")
    print(f"{'sft_fp32':<17} {1000 * t_sft32:8.0f} {1.0:6.2f}   "
          "(ratios of the *_fp32 rows are to this one)")
    for name in ('opd', 'opd_unbounded', 'opd_fp32'):
        dt, s = res[name]
        upd = dt - s['t_rollout'] - s['t_teacher']
        ref = t_sft32 if name.endswith('fp32') else t_sft
        print(f"{name:<17} {1000 * dt:8.0f} {dt / ref:6.2f} {1000 * s['t_rollout']:8.0f} "
              f"{1000 * s['t_teacher']:8.0f} {1000 * upd:8.0f} "
              f"{s['rollout_len'] / s['rollouts']:10.1f} {s['ended'] / s['rollouts']:6.2f}")
    r32 = res['rollout_fp32'][0]
    r16 = res['rollout_bf16'][0] if bf16 else float('nan')
    print(f"rollout alone: float32 {1000 * r32:.0f} ms, bf16 K/V + projection copy "
          f"{1000 * r16:.0f} ms" + ('' if bf16 else " (no bf16 kernels on this CPU)"))

def bench_versus(ckpt, ref, manifest, repeat=2):
    """Two models (ours or Whisper weights) on the same labeled clips, CPU fp32, encoder included:
    test WER and greedy decode speed (RTFx, best of repeat, the two alternating), side by side."""
    import torch
    import data
    import evaluate
    from checkpoint import load_checkpoint
    torch.set_num_threads(2)
    rows = data.read_manifest(manifest)
    models = {name: load_checkpoint(path)[:2] for name, path in (('ckpt', ckpt),
                                                                          ('ref', ref))}
    for model, tok in models.values():
        evaluate.transcribe(model, tok, rows[:2])  # warm-up
    res = {name: (float('inf'), None) for name in models}
    for _ in range(repeat):
        for name, (model, tok) in models.items():
            t0 = time.perf_counter()
            hyps = evaluate.transcribe(model, tok, rows)
            res[name] = min(res[name], (time.perf_counter() - t0, hyps), key=lambda r: r[0])
    print(f"{len(rows)} utterances ({manifest})")
    print(f"{'model':<40} {'WER %':>7} {'S':>5} {'D':>5} {'I':>5} {'params M':>9} {'RTFx':>7}")
    for name, path in (('ckpt', ckpt), ('ref', ref)):
        wall, hyps = res[name]
        r = evaluate.report(rows, hyps, wall)
        params = models[name][0].get_num_params() / 1e6
        print(f"{path:<40} {100 * r['wer']:7.2f} {r['s']:5d} {r['d']:5d} {r['i']:5d} "
              f"{params:9.1f} {r['rtfx']:7.1f}")
    print(f"speed {ckpt} / {ref}: {res['ref'][0] / res['ckpt'][0]:.2f}x")

MODES = {"scorer": bench_scorer, "whisper": bench_whisper, "opd": bench_opd, "versus": bench_versus}

if __name__ == "__main__":
    mode = sys.argv.pop(1) if len(sys.argv) > 1 else ""
    if mode not in MODES:
        sys.exit(f"usage: python bench.py {{{'|'.join(MODES)}}} [--key=value ...]")
    # bench_opd's options (--init_from, --manifest, --teacher_path, --device, --batch_size)
    teacher_path, manifest, batch_size = 'weights/base', 'data/synth_grammar/train.jsonl', 8
    init_from, device = 'teacher', 'cpu'
    ckpt, ref = 'out/long_opd/ckpt.pt', 'weights/tiny.en'  # bench_versus
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    if mode == 'opd':
        bench_opd(teacher_path, manifest, batch_size, init_from=init_from, device=device)
    elif mode == 'versus':
        bench_versus(ckpt, ref, manifest)
    else:
        MODES[mode]()
