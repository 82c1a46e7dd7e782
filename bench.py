"""
Small benchmarks, one mode per component:

    python bench.py scorer    # evaluate.score vs jiwer on the same reference/hypothesis pairs
    python bench.py whisper   # greedy RTFx and peak memory: ours vs faster-whisper, tiny.en and base, CPU fp32, 2 threads
    python bench.py opd       # one OPD step vs one supervised step of the same student and batch (see _opd_vs_sft)
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

def bench_opd(*args):
    """python bench.py opd [--init_from=CKPT] [--manifest=JSONL] [--teacher_path=P] [--device=cuda] [--batch_size=N]: a
    trained student (e.g. out/demo/base/ckpt.pt) emits EOT, so its rollouts end before the length bound; the default
    student is the teacher's layers 0 and 5, untrained."""
    kwargs = {}
    for a in args:
        key, _, value = a.lstrip('-').partition('=')
        if key not in ('init_from', 'manifest', 'teacher_path', 'device', 'batch_size') or not value:
            raise SystemExit(f"bench.py opd: unknown option {a} (--init_from, --manifest, --teacher_path, --device, --batch_size)")
        kwargs[key] = int(value) if key == 'batch_size' else value
    _opd_vs_sft(**kwargs)

def _opd_vs_sft(teacher_path='weights/base', manifest='data/synth_grammar/train.jsonl', batch_size=8, repeat=3,
              init_from='teacher', device='cpu'):
    """One OPD step vs one supervised step (cross-entropy on the labels) of the same student on the same batch, both
    with the frozen shared encoder's outputs cached (computed once per utterance, timed apart) and, as in the demo, only
    the decoder layers trained (embeddings frozen): ms per step, the ratio, and the OPD breakdown (rollout / teacher
    scoring / student update), with and without the rollout length bound; on CPU also in float32: the student's
    (student_bf16=False, the teacher still in bf16) and everything (teacher_bf16=False too), those against an SFT step
    in float32. The full-vocabulary KL diagnostics are left out, as in all but one step of every log_interval; on CUDA
    both steps run under bf16 autocast, as distill.py does."""
    from contextlib import nullcontext
    from types import SimpleNamespace
    import torch
    import data
    import distill
    teacher, tok, _ = distill.load_model(teacher_path)
    teacher.requires_grad_(False).eval().to(device)
    if init_from == 'teacher':
        from teacher import make_student
        student = make_student(teacher, n_decoder_layers=2, freeze_encoder=True)
    else:
        student = distill.load_model(init_from)[0]
    student.encoder.requires_grad_(False)
    student.decoder.token_embedding.requires_grad_(False)
    student.decoder.positional_embedding.requires_grad_(False)
    student.to(device).train()
    ctx = torch.autocast('cuda', torch.bfloat16) if device == 'cuda' else nullcontext()
    whisper = teacher.dims.n_audio_ctx == 1500 and tok.to_dict()['kind'] == 'whisper'
    rows = data.read_manifest(manifest)[:batch_size]
    batch = data.Batches(rows, tok, batch_size=batch_size, n_mels=teacher.dims.n_mels, n_frames=data.N_FRAMES if whisper
                         else None, shuffle=False).collate(list(range(len(rows))))
    prompts = [tok.sot_sequence(r.get('lang')) for r in rows]
    t0 = distill._now(device)
    xa = distill.EncoderCache(teacher.encoder, enabled=whisper)(batch['mel'].to(device), batch['audio'])
    t_enc = distill._now(device) - t0
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    rescore = distill.Rescore(student)
    def update(total, n):
        (total / n.clamp(min=1)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    def sft(bf16=distill.student_bf16):
        with distill.cpu_bf16(bf16, device, ctx):
            total, n = distill.ce_step(rescore, batch, xa, device)
        update(total, n)
        return {}
    def opd(cfg):
        total, n, stats = distill.opd_step(student, rescore, teacher, tok, batch, prompts, xa, xa, cfg, ctx, full_diag=False)
        update(total, n)
        return stats
    defaults = {k: getattr(distill, k) for k in distill.config_keys}
    runs = {'sft': sft, 'sft_fp32': lambda: sft(False), 'opd': lambda: opd(SimpleNamespace(**defaults)),
            'opd_unbounded': lambda: opd(SimpleNamespace(**dict(defaults, length_slack=10 ** 6))),
            'opd_student_fp32': lambda: opd(SimpleNamespace(**dict(defaults, student_bf16=False))),
            'opd_fp32': lambda: opd(SimpleNamespace(**dict(defaults, student_bf16=False, teacher_bf16=False)))}
    res = {}
    for name, fn in runs.items():
        fn()  # warm-up (allocations, AdamW state)
        best = None
        for _ in range(repeat):
            t0 = distill._now(device)
            stats = fn()
            dt = distill._now(device) - t0
            if best is None or dt < best[0]:
                best = (dt, stats)
        res[name] = best
    t_sft, t_sft32 = res['sft'][0], res['sft_fp32'][0]
    print(f"batch of {len(rows)} utterances ({batch['duration'].sum():.1f} s of audio), student "
          f"{student.get_num_params() / 1e6:.1f}M ({sum(p.numel() for p in params) / 1e6:.1f}M trained), teacher "
          f"{teacher.get_num_params() / 1e6:.1f}M; encoder once per utterance (cached after): {1000 * t_enc / len(rows):.0f} ms/utt")
    print(f"{'step':<17} {'ms':>8} {'x sft':>6} {'rollout':>8} {'teacher':>8} {'update':>8} {'tokens/utt':>10} {'ended':>6}")
    print(f"{'sft':<17} {1000 * t_sft:8.0f} {1.0:6.2f}")
    print(f"{'sft_fp32':<17} {1000 * t_sft32:8.0f} {1.0:6.2f}   (ratios of the *_fp32 rows are to this one)")
    out = {'sft_ms': 1000 * t_sft, 'sft_fp32_ms': 1000 * t_sft32, 'encoder_ms_per_utt': 1000 * t_enc / len(rows)}
    for name in ('opd', 'opd_unbounded', 'opd_student_fp32', 'opd_fp32'):
        dt, s = res[name]
        upd, ref = dt - s['t_rollout'] - s['t_teacher'], t_sft32 if name.endswith('fp32') else t_sft
        print(f"{name:<17} {1000 * dt:8.0f} {dt / ref:6.2f} {1000 * s['t_rollout']:8.0f} {1000 * s['t_teacher']:8.0f} "
              f"{1000 * upd:8.0f} {s['rollout_len'] / s['rollouts']:10.1f} {s['ended'] / s['rollouts']:6.2f}")
        out.update({f'{name}_ms': 1000 * dt, f'{name}_ratio': dt / ref, f'{name}_rollout_ms': 1000 * s['t_rollout'],
                    f'{name}_teacher_ms': 1000 * s['t_teacher'], f'{name}_update_ms': 1000 * upd})
    return out

MODES = {
    "scorer": bench_scorer,
    "whisper": bench_whisper,
    "opd": bench_opd,
}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in MODES or (sys.argv[2:] and sys.argv[1] != "opd"):
        print(f"usage: python bench.py {{{'|'.join(MODES)}}}", file=sys.stderr)
        sys.exit(2)
    MODES[sys.argv[1]](*sys.argv[2:])
