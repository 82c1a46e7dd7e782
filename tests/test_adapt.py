"""Distillation on a folder of the user's own recordings (adapt.py): the folder cut into clips at
pauses, transcribe()'s no-speech check on Whisper weights, the label-free recipe end to end, and
the student exported in the formats people load."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import checkpoint
import data
import synth
from tests.test_longform import LONG

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng")

def write(path, x, rate, channels=1):
    """16-kHz audio written at another rate and channel count, in blocks (libsndfile's OGG
    writer crashes on one long write)."""
    y = data.resample(x, data.SAMPLE_RATE, rate)
    y = np.stack([y] * channels, 1) if channels > 1 else y
    with sf.SoundFile(path, "w", rate, channels, format=path.rsplit(".", 1)[1].upper()) as f:
        for i in range(0, len(y), rate):
            f.write(y[i:i + rate])

def recording(tmp, name, seconds, voice="en-us", seed=0):
    """An espeak-ng voice reading LONG's sentences with 0.4-1.5 s pauses (synth.long_recording):
    16-kHz samples and the sentences' (start, end) in seconds."""
    path = os.path.join(tmp, name + ".wav")
    texts = [LONG[(seed + k) % len(LONG)] for k in range(200)]
    speaker = dict(voice=voice, speed=170, pitch=50)
    spans = synth.long_recording((path, texts, speaker, seconds, seed))
    x, _ = sf.read(path, dtype="float32")
    os.remove(path)
    return x, [(a, b) for a, b, _ in spans]

@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A user's folder: three recordings of ~3 minutes and one of ~1.5 (wav 22.05 kHz, stereo
    flac 44.1 kHz, ogg 48 kHz, mp3 16 kHz), 45 s of speech-like sound with no pause, a corrupt
    wav and a text file -> (folder, {file: sentence spans})."""
    tmp = str(tmp_path_factory.mktemp("my_audio"))
    rec = os.path.join(tmp, "rec")
    os.makedirs(os.path.join(rec, "day2"))
    truth = {}
    for k, (name, rate, channels, seconds) in enumerate([
            ("a.wav", 22050, 1, 180), ("day2/b.flac", 44100, 2, 180), ("c.ogg", 48000, 1, 170),
            ("d.mp3", 16000, 1, 90)]):
        x, spans = recording(tmp, f"r{k}", seconds, ["en-us", "en", "en-us+f3", "en+m3"][k], k)
        write(os.path.join(rec, name), x, rate, channels)
        truth[name] = spans
    t = np.arange(45 * data.SAMPLE_RATE) / data.SAMPLE_RATE  # babble: noise at a syllable rate
    rng = np.random.default_rng(0)
    babble = 0.3 * rng.standard_normal(len(t)) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    write(os.path.join(rec, "babble.wav"), babble.astype(np.float32), 16000)
    with open(os.path.join(rec, "broken.wav"), "wb") as f:
        f.write(b"RIFF\x24\x00\x00\x00WAVEfmt garbage")
    with open(os.path.join(rec, "notes.txt"), "w") as f:
        f.write("not audio\n")
    return rec, truth

def segment(rec, out, *args):
    p = subprocess.run([sys.executable, "adapt.py", "segment", rec, out, *args], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    return p.stdout

@pytest.mark.slow
def test_folder_becomes_clips_at_pauses(folder, tmp_path):
    """No clip over 30 s; every sentence inside exactly one clip and touching no other (no
    sentence split where a pause was); the pause-less stretch cut at the limit and counted; the
    corrupt file and the text file reported in a line each and skipped; a second run does
    nothing."""
    rec, truth = folder
    out = str(tmp_path / "clips")
    printed = segment(rec, out)
    rows = data.read_manifest(os.path.join(out, "manifest.jsonl"))
    assert max(r["duration"] for r in rows) <= 30.0
    assert all(sf.info(r["audio"]).samplerate == 16000 and sf.info(r["audio"]).channels == 1
               for r in rows)
    for name, spans in truth.items():
        clips = sorted((r["start"], r["end"]) for r in rows if r["source"] == name)
        assert all(a[1] <= b[0] for a, b in zip(clips, clips[1:]))  # disjoint
        assert len(clips) >= 3, name  # several minutes: several clips
        for a, b in spans:
            a, b = a + 0.03, b - 0.03  # mp3's and the resampler's edges
            inside = [c for c in clips if c[0] <= a and b <= c[1]]
            touching = [c for c in clips if c[0] < b and a < c[1]]
            assert len(inside) == 1 and len(touching) == 1, (name, a, b, clips)
    babble = [r for r in rows if r["source"] == "babble.wav"]
    assert len(babble) == 2 and sum(r["duration"] for r in babble) > 44
    lines = printed.splitlines()
    assert [line for line in lines if "broken.wav" in line] == [
        line for line in lines if line.startswith(f"skipped {os.path.join(rec, 'broken.wav')}:")]
    assert sum(line.startswith("skipped ") for line in lines) == 2  # broken.wav, notes.txt
    assert f"{len(rows)} clips ({len(rows)} new)" in printed and "1 cut at the 30-s limit" in printed
    stamps = {r["audio"]: os.stat(r["audio"]).st_mtime_ns for r in rows}
    again = segment(rec, out)
    assert f"{len(rows)} clips (0 new)" in again
    assert stamps == {r["audio"]: os.stat(r["audio"]).st_mtime_ns for r in rows}

def quiet_clips(directory):
    """10 s of silence, 5 s of noise, a 30-ms clip: Whisper's greedy decode says "you" to
    such audio without the no-speech check."""
    rng = np.random.default_rng(0)
    clips = {"silence": np.zeros(160000), "noise": 0.1 * rng.standard_normal(80000),
             "near_empty": 0.01 * rng.standard_normal(480)}
    paths = []
    for name, x in clips.items():
        paths.append(os.path.join(directory, f"{name}.wav"))
        sf.write(paths[-1], x.astype(np.float32), 16000)
    return paths

@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_silence_and_noise_get_no_words(weights, tmp_path, name):
    """evaluate.py on Whisper weights: silence, noise and a near-empty clip -> "" (without the
    check at least one of them is not); speech clips -> faster-whisper's transcribe() with its
    default no-speech settings (greedy, no timestamps)."""
    from tests.test_checkpoint import PARITY, faster_whisper_transcripts
    import evaluate
    quiet = quiet_clips(str(tmp_path))
    speech = []
    for i, text in enumerate(PARITY[:3]):
        speech.append(str(tmp_path / f"s{i}.wav"))
        subprocess.run(["espeak-ng", "-v", "en-us", "-w", speech[-1], text], check=True)
    data.write_manifest(tmp_path / "m.jsonl", [{"audio": p} for p in quiet + speech])
    model_dir, out = os.path.join(weights, name), tmp_path / "r.json"
    p = subprocess.run([sys.executable, "evaluate.py", f"--ckpt={model_dir}", "--language=en",
                        f"--manifest={tmp_path / 'm.jsonl'}", f"--out={out}", "--device=cpu"],
                       cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    hyps = [u["hyp"] for u in json.loads(out.read_text())["utts"]]
    assert hyps[:3] == ["", "", ""]
    torch.set_num_threads(2)
    audios = [data.load_audio(s) for s in speech]
    assert hyps[3:] == faster_whisper_transcripts(model_dir, audios) and all(hyps[3:])
    model, tok, _ = checkpoint.load_checkpoint(model_dir)
    unchecked = evaluate.transcribe(model, tok, [{"audio": q} for q in quiet], language="en")
    assert any(unchecked)

@pytest.mark.slow
def test_ct2_export_is_what_faster_whisper_reads(weights, tmp_path):
    """checkpoint.save_ct2 of tiny.en: load_ct2 reads back the same weights and vocabulary, and
    faster-whisper transcribes as it does from the original directory."""
    from tests.test_checkpoint import PARITY, faster_whisper_transcripts
    model, tok = checkpoint.load_whisper(os.path.join(weights, "tiny.en"))
    checkpoint.save_ct2(model, tok, str(tmp_path / "ct2"))
    again, tok2 = checkpoint.load_whisper(str(tmp_path / "ct2"))
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert tok2.ranks == tok.ranks and tok2.specials == tok.specials
    wav = str(tmp_path / "s.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", wav, PARITY[0]], check=True)
    audio = [data.load_audio(wav)]
    torch.set_num_threads(2)
    assert (faster_whisper_transcripts(str(tmp_path / "ct2"), audio) ==
            faster_whisper_transcripts(os.path.join(weights, "tiny.en"), audio))

@pytest.mark.slow
def test_recipe_end_to_end_and_export(folder, weights, tmp_path):
    """The README's commands at toy size with tiny.en as the teacher: segment, then the recipe
    (teacher transcripts, TD, OPD, the best stage by agreement, the table, the export); the
    exported student loads in whisper.load_model and in faster-whisper and transcribes a clip."""
    whisper = pytest.importorskip("whisper")
    rec, _ = folder
    out, run = str(tmp_path / "clips"), str(tmp_path / "run")
    segment(rec, out, "--max_seconds=8")
    rows = data.read_manifest(os.path.join(out, "manifest.jsonl"))
    data.write_manifest(os.path.join(out, "some.jsonl"), rows[:14])  # toy size
    p = subprocess.run([sys.executable, "adapt.py", "config/adapt_my_audio.py",
                        f"--manifest={os.path.join(out, 'some.jsonl')}", f"--out_dir={run}",
                        f"--teacher={os.path.join(weights, 'tiny.en')}", "--held_out=2",
                        "--td_iters=2", "--opd_iters=1", "--evals=1", "--batch_size=4",
                        "--max_new_tokens=24"], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.load(open(os.path.join(run, "results.json")))
    assert list(res["table"]) == ["teacher", "untrained student", "td", "td+opd"]
    assert res["table"]["teacher"]["vs_teacher"][0] == 0.0  # its own transcripts
    assert res["chosen"] in ("td", "opd") and "| td+opd |" in p.stdout
    assert len(data.read_manifest(os.path.join(run, "opd.jsonl"))) == 14 - 2 - 6
    student, tok, ckpt = checkpoint.load_checkpoint(os.path.join(run, res["chosen"], "ckpt.pt"))
    assert ckpt["best_val_wer"] == res["best_val_wer"][res["chosen"]]
    clip = data.load_audio(rows[0]["audio"])
    torch.set_num_threads(2)
    ref = whisper.load_model(os.path.join(run, "export", "whisper.pt"), device="cpu")
    assert ref.dims.n_text_layer == 2
    text = whisper.transcribe(ref, clip, language="en", temperature=0.0, fp16=False)["text"]
    assert isinstance(text, str)
    from faster_whisper import WhisperModel
    fw = WhisperModel(os.path.join(run, "export", "ct2"), device="cpu", compute_type="float32")
    segments, _ = fw.transcribe(clip, language="en", beam_size=1, temperature=0.0)
    assert isinstance("".join(s.text for s in segments), str)
    hf = json.load(open(os.path.join(run, "export", "hf", "config.json")))
    assert hf["decoder_layers"] == 2
