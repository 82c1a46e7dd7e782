"""A clip longer than Whisper's 30-s window through evaluate.py loses no words: ~2 minutes of
espeak-ng sentences, transcribed in windows with timestamps like Whisper's transcribe()."""
import difflib
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import checkpoint
import longform
from score import normalize_en

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LONG = [
    "the old lighthouse keeper climbed the stairs every night",
    "a gentle rain fell on the quiet village streets",
    "she packed her suitcase and called a taxi to the airport",
    "the baker wakes up early to make fresh bread",
    "our neighbours planted roses along the garden fence",
    "the museum opens its new exhibition next month",
    "he forgot his umbrella on the bus again",
    "the river flows slowly past the ancient stone bridge",
    "please remember to lock the door when you leave",
    "the students listened carefully to the history lesson",
    "a small boat drifted across the calm blue lake",
    "my brother repaired the bicycle in the garage",
    "the orchestra played a beautiful piece by mozart",
    "we watched the sunset from the top of the hill",
    "the doctor told him to drink more water",
    "fresh snow covered the mountains during the night",
    "the farmer sold apples and pears at the market",
    "she wrote a long letter to her grandmother",
    "the children built a sandcastle near the waves",
    "a loud noise woke everyone in the house",
    "the chef added a pinch of salt to the soup",
    "they walked through the forest looking for mushrooms",
    "the pilot announced that the flight would land soon",
    "an owl was hooting in the tall oak tree",
    "the shop on the corner sells newspapers and sweets",
    "he painted the kitchen walls a bright yellow",
    "the football fans cheered when the team scored",
    "a warm breeze carried the smell of the sea",
    "the library has thousands of books about science",
    "we finished the puzzle just before midnight",
]

def long_clip(directory):
    """The sentences spoken one after the other with 0.6 s of silence between them, one wav
    (~113 s at espeak-ng's 22.05 kHz)."""
    parts = []
    for i, text in enumerate(LONG):
        path = os.path.join(directory, f"part{i}.wav")
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", path, text], check=True)
        x, sr = sf.read(path, dtype="float32")
        parts += [x, np.zeros(int(0.6 * sr), np.float32)]
    path = os.path.join(directory, "long.wav")
    sf.write(path, np.concatenate(parts), sr)
    return path

def sentences_found(hyp):
    """The fraction of each sentence's words that the transcript has, aligned in order."""
    words = [normalize_en(s).split() for s in LONG]
    ref = [w for s in words for w in s]
    owner = [i for i, s in enumerate(words) for _ in s]
    found = [0] * len(LONG)
    blocks = difflib.SequenceMatcher(None, ref, normalize_en(hyp).split(), autojunk=False)
    for a, _, size in blocks.get_matching_blocks():
        for j in range(a, a + size):
            found[owner[j]] += 1
    return [f / len(s) for f, s in zip(found, words)]

@pytest.mark.slow
def test_two_minutes_lose_no_sentence(weights, tmp_path):
    """tiny.en on the clip: every sentence is there (most of its words, in order), few words
    deleted, and the transcript is openai-whisper's and faster-whisper's transcribe() (greedy,
    temperature 0, timestamps, no previous text) on the same samples."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    whisper = pytest.importorskip("whisper")
    from faster_whisper import WhisperModel
    wav = long_clip(str(tmp_path))
    assert 100 < sf.info(wav).duration < 130
    data.write_manifest(tmp_path / "long.jsonl", [{"audio": wav, "text": " ".join(LONG)}])
    model_dir, out = os.path.join(weights, "tiny.en"), tmp_path / "results.json"
    p = subprocess.run([sys.executable, "evaluate.py", f"--ckpt={model_dir}", "--device=cpu",
                        f"--manifest={tmp_path / 'long.jsonl'}", f"--out={out}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "1 clips over 30 s: transcribed in 30-s windows" in p.stdout
    res = json.loads(out.read_text())
    hyp = res["utts"][0]["hyp"]
    assert res["windowed"] == 1 and res["complete"] is True
    found = sentences_found(hyp)
    print(f"long-form WER {100 * res['wer']:.2f}% (S {res['s']} D {res['d']} I {res['i']} of "
          f"{res['n']}); least of a sentence found {min(found):.0%}")
    assert min(found) >= 0.5, list(zip(LONG, found))
    assert res["d"] <= 0.05 * res["n"] and res["wer"] < 0.3
    # the references' transcribe() on the same 16-kHz samples
    torch.set_num_threads(2)
    audio = data.load_audio(wav)
    model, tok = checkpoint.load_whisper(model_dir)
    checkpoint.save_pt(model, str(tmp_path / "tiny.en.pt"), tok)
    ref = whisper.load_model(str(tmp_path / "tiny.en.pt"), device="cpu")
    theirs = whisper.transcribe(ref, audio, language="en", temperature=0.0, fp16=False,
                                condition_on_previous_text=False)["text"].strip()
    assert hyp == theirs
    fw = WhisperModel(model_dir, device="cpu", compute_type="float32", cpu_threads=2)
    segments, _ = fw.transcribe(audio, language="en", beam_size=1, temperature=0.0,
                                condition_on_previous_text=False, vad_filter=False)
    assert hyp == "".join(s.text for s in segments).strip()

def test_timestamp_rules_are_openai_whispers():
    """longform.timestamp_rules masks what openai-whisper's ApplyTimestampRules masks, step by
    step along sequences sampled under the rules (a toy vocabulary: 10 text tokens, EOT, a
    control token, <|notimestamps|>, 40 timestamps)."""
    decoding = pytest.importorskip("whisper.decoding")
    from types import SimpleNamespace
    tok = SimpleNamespace(eot=10, no_timestamps=12, timestamp_begin=13)
    rules = decoding.ApplyTimestampRules(tok, sample_begin=2, max_initial_timestamp_index=5)
    g = torch.Generator().manual_seed(0)
    steps = 0
    for _ in range(200):
        sampled = []
        while len(sampled) < 30:
            logits = torch.randn(53, generator=g) * 3
            logits[13:] += torch.rand(1, generator=g) * 4 - 1  # more or fewer timestamps
            theirs = logits.clone()[None]
            rules.apply(theirs, torch.tensor([[0, 1] + sampled]))
            ours = longform.timestamp_rules(logits.clone(), sampled, tok, max_initial=5)
            assert torch.equal(ours, theirs[0]), sampled
            steps += 1
            token = int(torch.multinomial(ours.softmax(-1), 1, generator=g))
            if token == tok.eot:
                break
            sampled.append(token)
    assert steps > 2000
