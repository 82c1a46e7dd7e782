"""evaluate.py end to end: a tiny random checkpoint, a 3-utterance espeak-ng manifest (one without
text), the CLI, load_checkpoint and EncoderCache; one-line errors for bad settings, clips and
clips too long for the model."""
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict

import numpy as np
import pytest
import soundfile as sf
import torch

import common
import data
import evaluate
from checkpoint import load_checkpoint
from model import ModelDimensions, Whisper
from tokenizer import SentencePieceTokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TEXTS = ["the cat sat on the mat", "twenty one dogs ran home", None]
MORE = ["a bird in the hand", "seven red boats"]  # for the order test: more distinct rows

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    d = tmp_path_factory.mktemp("eval")
    rows = []
    for k, text in enumerate(TEXTS + MORE):
        wav = d / f"u{k}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), text or "hello there"], check=True)
        rows.append({"audio": str(wav), **({"text": text.capitalize() + "."} if text else {})})
    data.write_manifest(d / "test.jsonl", rows[:3])
    data.write_manifest(d / "more.jsonl", rows)
    tok = SentencePieceTokenizer.train([t for t in TEXTS if t] * 20 + ["hello there"] * 5,
                                            vocab_size=40)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=300, n_audio_state=32, n_audio_head=2,
                           n_audio_layer=1, n_vocab=tok.n_vocab, n_text_ctx=24, n_text_state=32,
                           n_text_head=2, n_text_layer=1)
    torch.manual_seed(0)
    model = Whisper(dims)
    for p in model.parameters():  # peaked outputs: different audio, different transcripts
        p.data.normal_(0, 1.0)
    ckpt = {"model": model.state_dict(), "model_args": asdict(dims), "tokenizer": tok.to_dict(),
            "iter_num": 0}
    torch.save(ckpt, d / "ckpt.pt")
    return d, model, tok

def _run(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)

def test_cli_writes_results(setup):
    d, _, _ = setup
    out = d / "results.json"
    p = _run(f"--ckpt={d / 'ckpt.pt'}", f"--manifest={d / 'test.jsonl'}", f"--out={out}",
             "--batch_size=2")
    assert p.returncode == 0, p.stderr
    assert "WER" in p.stdout and "scored 2 of 3" in p.stdout
    res = json.loads(out.read_text())
    for key in ("wer", "n", "s", "d", "i", "utterances", "audio_seconds", "rtfx", "median_utt_wer",
                "utts"):
        assert key in res, key
    assert res["utterances"] == 3 and res["scored"] == 2 and res["n"] == 10  # "twenty one" -> "21"
    assert [u["ref"] is None for u in res["utts"]] == [False, False, True]
    assert set(res["utts"][0]) == {"audio", "ref", "hyp", "errors"}
    assert res["utts"][2]["errors"] is None
    assert sum(u["errors"] for u in res["utts"][:2]) == res["s"] + res["d"] + res["i"]

def test_cli_cer_with_beam(setup):
    d, _, _ = setup
    p = _run(f"--ckpt={d / 'ckpt.pt'}", f"--manifest={d / 'test.jsonl'}", "--language=zh",
             "--beam=2", "--max_utts=1")
    assert p.returncode == 0, p.stderr
    assert "CER" in p.stdout

def test_cli_errors_are_one_line(setup):
    d, _, _ = setup
    ckpt, manifest = f"--ckpt={d / 'ckpt.pt'}", f"--manifest={d / 'test.jsonl'}"
    for args, name in [((ckpt, f"--manifest={d / 'missing.jsonl'}"), "missing.jsonl"),
                       ((f"--ckpt={d / 'nope.pt'}", manifest), "nope.pt"),
                       ((ckpt, manifest, f"--out_manifest={d / 'no_dir' / 'x.jsonl'}"), "no_dir")]:
        p = _run(*args)
        assert p.returncode == 1 and name in p.stderr, p.stderr
        assert len(p.stderr.strip().splitlines()) == 1, p.stderr

def test_out_manifest_keeps_ended_nonempty_rows(setup, monkeypatch, capsys):
    d, _, tok = setup
    real, seen = evaluate.decode, []
    def decode(*args, **kw):  # real transcripts; row 1 cut before EOT, row 2 empty
        seen[:] = real(*args, **kw)[0]
        return [seen[0], seen[1], []], [True, False, True]
    monkeypatch.setattr(evaluate, "decode", decode)
    out = d / "pseudo" / "pseudo.jsonl"
    out.parent.mkdir()
    monkeypatch.setattr(sys, "argv", ["evaluate.py", f"--ckpt={d / 'ckpt.pt'}",
                                      f"--manifest={d / 'test.jsonl'}", f"--out_manifest={out}"])
    evaluate.main()
    assert "kept 1 of 3" in capsys.readouterr().out
    rows, src = data.read_manifest(out), data.read_manifest(d / "test.jsonl")
    hyp = tok.decode(seen[0]).strip()
    # audio resolves to the same file; data.check_audio filled in the duration
    assert hyp and rows == [dict(src[0], text=hyp, duration=rows[0]["duration"])]

def test_transcribe_returns_rows_in_order(setup):
    d, model, tok = setup
    rows = data.read_manifest(d / "more.jsonl")
    # a fixed mel length: a row's transcript does not depend on the rest of its batch
    alone = [evaluate.decode(model, tok, [r], batch_size=1, n_frames=600)[0][0] for r in rows]
    assert len({tuple(t) for t in alone}) > 1  # distinct transcripts: a wrong order shows
    perm = [3, 0, 4, 2, 1]
    tokens, ended = evaluate.decode(model, tok, [rows[k] for k in perm], batch_size=2, n_frames=600)
    assert tokens == [alone[k] for k in perm] and len(ended) == 5
    assert all(isinstance(e, bool) for e in ended)
    texts = evaluate.transcribe(model, tok, [rows[k] for k in perm], batch_size=2, n_frames=600)
    assert texts == [tok.decode(alone[k]).strip() for k in perm]

def test_load_checkpoint_round_trip(setup, tmp_path):
    d, model, tok = setup
    ckpt = torch.load(d / "ckpt.pt", weights_only=True)
    opt = torch.optim.AdamW(model.parameters())
    ckpt.update(model={"_orig_mod." + k: v for k, v in ckpt["model"].items()},  # torch.compile
                optimizer=opt.state_dict(), frozen=["encoder.conv1.weight"], best_val_wer=None,
                loader={"epoch": 1, "step": 2}, rng={"torch": torch.get_rng_state()})
    torch.save(ckpt, tmp_path / "ckpt.pt")
    loaded, tok2, ck = load_checkpoint(tmp_path / "ckpt.pt")
    assert not loaded.training and ck["loader"] == {"epoch": 1, "step": 2}
    assert tok2.to_dict() == tok.to_dict() and isinstance(tok2.to_dict()["model"], bytes)
    sd = model.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in loaded.state_dict().items())

def test_load_checkpoint_bad_files_are_one_line(setup, tmp_path):
    d, _, _ = setup
    good = (d / "ckpt.pt").read_bytes()
    (tmp_path / "random.pt").write_bytes(os.urandom(4096))
    (tmp_path / "truncated.pt").write_bytes(good[:len(good) // 2])
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"model": {}, "model_args": {}, "tokenizer": data.Batches}, tmp_path / "object.pt")
    for name in ("random.pt", "truncated.pt", "list.pt", "object.pt", "missing.pt"):
        with pytest.raises(ValueError) as e:  # object.pt: weights_only refuses to unpickle it
            load_checkpoint(tmp_path / name)
        assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value), str(e.value)

def test_encoder_cache_memory_and_disk(tmp_path, monkeypatch):
    torch.manual_seed(8)
    model = Whisper(ModelDimensions(n_mels=80, n_audio_ctx=60, n_audio_state=32, n_audio_head=2,
                                    n_audio_layer=1, n_vocab=40, n_text_ctx=16, n_text_state=32,
                                    n_text_head=2, n_text_layer=1))
    mel = torch.randn(3, 80, 120)
    paths = [str(tmp_path / f"{name}.wav") for name in "abc"]  # keyed on path, size and mtime
    for p in paths:
        open(p, "w").write("x")
    cache = common.EncoderCache(model.encoder, directory=str(tmp_path / "cache"))
    xa = cache(mel, paths)
    torch.testing.assert_close(xa, model.encoder(mel).detach().half().float())
    assert xa.dtype == torch.float32 and len(os.listdir(tmp_path / "cache")) == 3
    for f in os.listdir(tmp_path / "cache"):  # the files are plain tensors
        torch.load(tmp_path / "cache" / f, weights_only=True)
    again = common.EncoderCache(model.encoder, directory=str(tmp_path / "cache"))  # a later run
    assert torch.equal(again(torch.zeros(2, 80, 120), [paths[2], paths[0]]), xa[[2, 0]])
    open(paths[0], "w").write("a regenerated file")  # a new corpus at the same path: encoded again
    fresh = common.EncoderCache(model.encoder, directory=str(tmp_path / "cache"))
    zeros = torch.zeros(1, 80, 120)
    assert torch.equal(fresh(zeros, [paths[0]]), model.encoder(zeros).detach().half().float())
    monkeypatch.setattr(common.EncoderCache, "FEATURES", "other")  # files of other features:
    other = common.EncoderCache(model.encoder, directory=str(tmp_path / "cache"))  # not read
    assert torch.equal(other(zeros, [paths[1]]), model.encoder(zeros).detach().half().float())
    memory = common.EncoderCache(model.encoder)  # no directory: in memory only
    assert torch.equal(memory(mel, paths), memory(torch.zeros_like(mel), paths))

# -----------------------------------------------------------------------------
# no word is lost silently: bad settings, bad clips and clips too long are one line, exit 1

def _cli(monkeypatch, capsys, *args):
    """evaluate.cli() (what `python evaluate.py` runs) in this process -> (status, out, err)."""
    monkeypatch.setattr(sys, "argv", ["evaluate.py", *map(str, args)])
    try:
        evaluate.cli()
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err

def _one_line(code, err, *names):
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert all(str(name) in err for name in names), err

def test_cli_bad_settings(setup, monkeypatch, capsys):
    d, _, _ = setup
    ckpt, manifest = f"--ckpt={d / 'ckpt.pt'}", f"--manifest={d / 'test.jsonl'}"
    bad = ["--batch_size=0", "--batch_size=-3", "--beam=0", "--beam=-1", "--max_utts=-1"]
    if not torch.cuda.is_available():
        bad.append("--device=cuda")
    for arg in bad:
        code, _, err = _cli(monkeypatch, capsys, ckpt, manifest, arg)
        _one_line(code, err, arg)
    (d / "empty.jsonl").write_text("\n")
    code, _, err = _cli(monkeypatch, capsys, ckpt, f"--manifest={d / 'empty.jsonl'}")
    _one_line(code, err, d / "empty.jsonl")

def test_cli_reads_every_header_first(setup, monkeypatch, capsys):
    d, _, _ = setup
    (d / "garbage.wav").write_bytes(os.urandom(2048))
    good = data.read_manifest(d / "test.jsonl")
    monkeypatch.setattr(evaluate, "decode", None)  # not reached: the headers fail first
    for name in ("missing.wav", "garbage.wav"):
        data.write_manifest(d / "bad.jsonl", good + [{"audio": str(d / name), "text": "x"}])
        code, _, err = _cli(monkeypatch, capsys, f"--ckpt={d / 'ckpt.pt'}",
                            f"--manifest={d / 'bad.jsonl'}")
        _one_line(code, err, d / name)

def test_cli_keeps_finished_transcripts_when_a_clip_fails(setup, monkeypatch, capsys):
    """A clip whose samples are NaN (found only on reading, after the shorter clips decoded): the
    finished transcripts are in --out, marked incomplete, and the error is one line."""
    d, _, _ = setup
    x = np.random.default_rng(0).normal(0, 0.01, 5 * 16000).astype(np.float32)
    x[40000] = np.nan
    sf.write(d / "nan.wav", x, 16000, subtype="FLOAT")  # the longest clip: decoded last
    good = data.read_manifest(d / "test.jsonl")
    data.write_manifest(d / "nan.jsonl", good + [{"audio": str(d / "nan.wav"), "text": "x"}])
    ckpt, out = f"--ckpt={d / 'ckpt.pt'}", d / "nan.json"
    code, _, err = _cli(monkeypatch, capsys, ckpt, f"--manifest={d / 'nan.jsonl'}",
                        f"--out={out}", "--batch_size=1")
    _one_line(code, err, d / "nan.wav", "NaN")
    res = json.loads(out.read_text())
    assert res["complete"] is False and str(d / "nan.wav") in res["error"]
    assert _cli(monkeypatch, capsys, ckpt, f"--manifest={d / 'test.jsonl'}", "--batch_size=1",
                f"--out={d / 'good.json'}")[0] == 0
    full = json.loads((d / "good.json").read_text())
    assert full["complete"] is True and res["utts"] == full["utts"]

def test_too_long_for_the_encoder_refused_or_truncated(setup, monkeypatch, capsys):
    """Our model's encoder takes 600 mel frames (n_audio_ctx 300 x conv_stride 2): 6 s. A 7-s
    clip is refused, naming it and both lengths, unless --truncate=True: then counted."""
    d, model, tok = setup
    x = np.random.default_rng(1).normal(0, 0.01, 7 * 16000).astype(np.float32)
    sf.write(d / "long.wav", x, 16000)
    rows = data.read_manifest(d / "test.jsonl")[:1] + [{"audio": str(d / "long.wav")}]
    data.write_manifest(d / "long.jsonl", rows)
    ckpt, manifest = f"--ckpt={d / 'ckpt.pt'}", f"--manifest={d / 'long.jsonl'}"
    code, _, err = _cli(monkeypatch, capsys, ckpt, manifest)
    _one_line(code, err, d / "long.wav", "7.00 s", "6.00 s", "--truncate=True")
    code, out, err = _cli(monkeypatch, capsys, ckpt, manifest, "--truncate=True",
                          f"--out={d / 'long.json'}")
    assert code == 0, err
    assert "truncated 1 clips to the model's 6.00 s" in out
    assert json.loads((d / "long.json").read_text())["truncated"] == 1
    with pytest.raises(ValueError, match="long.wav: 7.00 s of audio"):  # train.py, demo.py
        evaluate.transcribe(model, tok, rows)
    assert len(evaluate.transcribe(model, tok, rows, truncate=True)) == 2
