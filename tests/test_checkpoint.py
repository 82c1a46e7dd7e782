"""checkpoint.py: Whisper checkpoints (CTranslate2 / openai .pt / Hugging Face) and the Whisper
tokenizer, checked against openai-whisper, the `tokenizers` package, transformers and
faster-whisper (test-only references)."""
from functools import partial
import json
import os
import pickle
import random
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import checkpoint
from decoding import beam_search, generate
import student as student_io
import tokenizer as tokenizer_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope="session")
def tiny(weights):  # weights: tests/conftest.py
    return checkpoint.load_whisper(os.path.join(weights, "tiny.en"))

def logits(model, tokens, seed=0, n_frames=3000):
    g = torch.Generator().manual_seed(seed)
    mel = torch.randn(1, model.dims.n_mels, n_frames, generator=g)
    with torch.no_grad():
        return model(mel, torch.tensor([tokens]))

# -----------------------------------------------------------------------------
# loading and exporting

@pytest.mark.parametrize("name", ["tiny.en", pytest.param("base", marks=pytest.mark.slow)])
def test_ct2_matches_openai_whisper(weights, tmp_path, name):
    whisper = pytest.importorskip("whisper")
    model, tok = checkpoint.load_whisper(os.path.join(weights, name))
    assert model.dims.n_vocab == tok.n_vocab
    path = str(tmp_path / f"{name}.pt")
    checkpoint.save_pt(model, path, tok)
    ref = whisper.load_model(path, device="cpu")
    tokens = tok.sot_sequence() + tok.encode(" The quick brown fox.")
    a = logits(model, tokens)
    with torch.no_grad():
        mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(0))
        b = ref(mel, torch.tensor([tokens]))
    assert (a - b).abs().max() < 1e-4
    # the same weights through openai-whisper's tokenizer: same special ids and prompt
    wt = whisper.tokenizer.get_tokenizer(tok.multilingual, num_languages=len(tok.languages),
                                         language="en", task="transcribe")
    assert ((wt.eot, wt.sot, wt.no_timestamps, wt.no_speech) ==
            (tok.eot, tok.sot, tok.no_timestamps, tok.no_speech))
    assert list(wt.sot_sequence_including_notimestamps) == tok.sot_sequence()
    assert list(wt.non_speech_tokens) == tok.non_speech_tokens()

def test_special_ids(weights):
    en, multi = (tokenizer_io.load_tokenizer(os.path.join(weights, n)) for n in ("tiny.en", "base"))
    assert (en.eot, en.sot, en.n_vocab, en.multilingual) == (50256, 50257, 51864, False)
    assert (multi.eot, multi.sot, multi.n_vocab, multi.multilingual) == (50257, 50258, 51865, True)
    assert en.sot_sequence() == [50257, 50362]
    assert multi.sot_sequence() == [50258, 50259, 50359, 50363]
    assert multi.sot_sequence("zh")[1] == 50260
    for name, tok in (("tiny.en", en), ("base", multi)):
        cfg = json.load(open(os.path.join(weights, name, "config.json")))
        assert tok.suppress_blank == cfg["suppress_ids_begin"]  # CTranslate2's first-step ban
        tokenizer_json = json.load(open(os.path.join(weights, name, "tokenizer.json")))
        added = {t["content"]: t["id"] for t in tokenizer_json["added_tokens"]}
        nospeech = tok.specials.get("<|nospeech|>")
        assert all(tok.specials.get(k, nospeech) == v for k, v in added.items())
        assert tok.specials["<|30.00|>"] == tok.n_vocab - 1

def test_suppress_equals_faster_whisper(weights):
    tokenizers = pytest.importorskip("tokenizers")
    fw = pytest.importorskip("faster_whisper.transcribe")
    from faster_whisper.tokenizer import Tokenizer
    for name, multilingual in (("tiny.en", False), ("base", True)):
        tok = tokenizer_io.load_tokenizer(os.path.join(weights, name))
        hf = tokenizers.Tokenizer.from_file(os.path.join(weights, name, "tokenizer.json"))
        ft = Tokenizer(hf, multilingual, task="transcribe", language="en")
        assert tok.suppress == list(fw.get_suppressed_tokens(ft, [-1]))
        assert tok.sot_sequence() == ft.sot_sequence + [ft.no_timestamps]

def test_round_trips(tiny, tmp_path):
    model, tok = tiny
    tokens = tok.sot_sequence() + tok.encode(" Hello there, world!")
    ref = logits(model, tokens, n_frames=400)
    checkpoint.save_pt(model, str(tmp_path / "m.pt"), tok)
    m2, t2 = checkpoint.load_whisper(str(tmp_path / "m.pt"))
    assert torch.equal(logits(m2, tokens, n_frames=400), ref)
    assert t2.encode("x y z") == tok.encode("x y z")
    checkpoint.save_hf(model, tok, str(tmp_path / "hf"))
    m3, t3 = checkpoint.load_whisper(str(tmp_path / "hf"))
    assert torch.equal(logits(m3, tokens, n_frames=400), ref)
    assert t3.sot_sequence() == tok.sot_sequence()
    # a .pt without the tokenizer key (as openai-whisper writes it) finds openai-whisper's assets
    # or a file beside it
    ckpt = torch.load(str(tmp_path / "m.pt"), weights_only=True)
    del ckpt["tokenizer"]
    os.makedirs(tmp_path / "plain")
    torch.save(ckpt, str(tmp_path / "plain" / "m.pt"))
    os.symlink(tok.files["tokenizer.json"], str(tmp_path / "plain" / "tokenizer.json"))
    m4, t4 = checkpoint.load_whisper(str(tmp_path / "plain" / "m.pt"))
    assert torch.equal(logits(m4, tokens, n_frames=400), ref) and t4.eot == tok.eot

@pytest.mark.slow
def test_transformers_reads_hf_export(tiny, tmp_path):
    transformers = pytest.importorskip(
        "transformers", reason="transformers not installed (test-only: pip install transformers)")
    model, tok = tiny
    checkpoint.save_hf(model, tok, str(tmp_path / "hf"))
    hf = transformers.WhisperForConditionalGeneration.from_pretrained(str(tmp_path / "hf")).eval()
    mel = torch.randn(1, 80, 3000, generator=torch.Generator().manual_seed(1))
    tokens = torch.tensor([tok.sot_sequence() + tok.encode(" one two three")])
    with torch.no_grad():
        a = model(mel, tokens)
        b = hf(input_features=mel, decoder_input_ids=tokens).logits
        assert (a - b).abs().max() < 1e-4
        # greedy transcript of real speech: our generate vs an argmax loop over transformers'
        audio = _espeak_audio(str(tmp_path), ["the quick brown fox jumps over the lazy dog"])[0]
        mel = _fw_features(audio)[None]
        ours = generate(model, model.encoder(mel), tok.sot_sequence(), tok.eot, max_new_tokens=60,
                        suppress=tok.suppress, suppress_blank=tok.suppress_blank).tokens
        seq = tok.sot_sequence()
        enc = hf.model.encoder(mel).last_hidden_state
        for step in range(60):
            lg = hf(encoder_outputs=(enc,), decoder_input_ids=torch.tensor([seq])).logits[0, -1]
            lg[tok.suppress] = -float("inf")
            if step == 0:
                lg[tok.suppress_blank] = -float("inf")
            seq.append(int(lg.argmax()))
            if seq[-1] == tok.eot:
                break
    assert ours[0] == seq[len(tok.sot_sequence()):-1]
    assert "lazy dog" in tok.decode(ours[0]).lower()

def test_hf_loader_checks(tiny, tmp_path):
    model, tok = tiny
    checkpoint.save_hf(model, tok, str(tmp_path))
    header_len = struct.unpack("<Q", open(tmp_path / "model.safetensors", "rb").read(8))[0]
    header = json.loads(open(tmp_path / "model.safetensors", "rb").read(8 + header_len)[8:])
    assert "model.decoder.layers.0.encoder_attn.k_proj.weight" in header
    assert "model.encoder.layers.0.self_attn.k_proj.bias" not in header
    cfg = json.load(open(tmp_path / "config.json"))
    del cfg["d_model"]
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    with pytest.raises(ValueError, match=r"config.json: missing field\(s\) d_model"):
        checkpoint.load_whisper(str(tmp_path))

def test_safetensors_dtypes(tmp_path):
    """fp16 / bf16 tensors are read (as fp32); anything else is a clear error."""
    a = torch.randn(3, 4)
    raw = {"h": a.half(), "b": a.bfloat16()}
    header, blobs, off = {}, b"", 0
    for k, t in raw.items():
        blob = t.view(torch.int16).numpy().tobytes()
        header[k] = {"dtype": {"h": "F16", "b": "BF16"}[k], "shape": [3, 4],
                     "data_offsets": [off, off + len(blob)]}
        blobs += blob
        off += len(blob)
    h = json.dumps(header).encode()
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + blobs)
    t = checkpoint.read_safetensors(str(tmp_path / "x.safetensors"))
    assert torch.equal(t["h"], a.half().float()) and torch.equal(t["b"], a.bfloat16().float())
    header["h"]["dtype"] = "I8"
    h = json.dumps(header).encode()
    (tmp_path / "y.safetensors").write_bytes(struct.pack("<Q", len(h)) + h + blobs)
    with pytest.raises(ValueError, match="y.safetensors: tensor h has dtype I8"):
        checkpoint.read_safetensors(str(tmp_path / "y.safetensors"))

# -----------------------------------------------------------------------------
# bad inputs: one-line errors naming the file

def _ct2_dir(weights, tmp_path, model_bin=None, config=None, tokenizer=True):
    d = tmp_path / "ct2"
    d.mkdir()
    src = os.path.join(weights, "tiny.en")
    if model_bin is None:
        os.symlink(os.path.realpath(os.path.join(src, "model.bin")), d / "model.bin")
    else:
        (d / "model.bin").write_bytes(model_bin)
    if config is None:
        os.symlink(os.path.realpath(os.path.join(src, "config.json")), d / "config.json")
    else:
        (d / "config.json").write_text(json.dumps(config))
    if tokenizer:
        os.symlink(os.path.realpath(os.path.join(src, "tokenizer.json")), d / "tokenizer.json")
    return str(d)

def _one_line_error(path, match):
    with pytest.raises(ValueError, match=match) as e:
        checkpoint.load_whisper(path)
    assert "\n" not in str(e.value)

def test_truncated_model_bin(weights, tmp_path):
    head = open(os.path.join(weights, "tiny.en", "model.bin"), "rb").read(1 << 20)
    _one_line_error(_ct2_dir(weights, tmp_path, model_bin=head), r"model.bin: truncated")

def test_config_missing_fields(weights, tmp_path):
    _one_line_error(_ct2_dir(weights, tmp_path, config={"lang_ids": []}),
                    r"config.json: missing field\(s\) suppress_ids")

def test_missing_tokenizer(weights, tmp_path):
    _one_line_error(_ct2_dir(weights, tmp_path, tokenizer=False),
                    r"tokenizer.json: tokenizer file not found")

def _ct2_bytes(variables):
    """A minimal CTranslate2 model.bin (format of ctranslate2/specs/model_spec.py),
    variables: name -> (dtype id, array)."""
    s = lambda x: struct.pack("<H", len(x) + 1) + x.encode() + b"\0"
    out = struct.pack("<I", 6) + s("WhisperSpec") + struct.pack("<II", 3, len(variables))
    for name, (dtype_id, arr) in variables.items():
        out += s(name) + struct.pack("<B", arr.ndim)
        out += b"".join(struct.pack("<I", d) for d in arr.shape)
        out += struct.pack("<BI", dtype_id, arr.nbytes) + arr.tobytes()
    return out + struct.pack("<I", 0)

def test_int8_model(weights, tmp_path):
    blob = _ct2_bytes({"decoder/activation": (1, np.array(3, np.int8)),
                       "encoder/layer_0/ffn/linear_0/weight": (1, np.zeros((4, 4), np.int8)),
                       "encoder/layer_0/ffn/linear_0/weight_scale": (0, np.ones(4, np.float32))})
    _one_line_error(_ct2_dir(weights, tmp_path, model_bin=blob),
                    r"model.bin: variable encoder/layer_0/ffn/linear_0/weight is int8-quantized; "
                    r"re-export")

def test_ct2_reader_dtypes(tmp_path):
    a = np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)
    bf16 = torch.from_numpy(a).bfloat16().view(torch.int16).numpy()
    blob = _ct2_bytes({"a": (0, a), "b": (4, a.astype(np.float16)), "c": (5, bf16)})
    (tmp_path / "m.bin").write_bytes(blob)
    spec, v = checkpoint.read_ct2(str(tmp_path / "m.bin"))
    assert spec == "WhisperSpec" and torch.equal(v["a"], torch.from_numpy(a))
    assert v["b"].dtype == torch.float16
    assert torch.equal(v["c"], torch.from_numpy(a).bfloat16().float())

def test_cli_errors():
    run = lambda *args: subprocess.run([sys.executable, "checkpoint.py", *args], cwd=ROOT,
                                       capture_output=True, text=True)
    r = run()
    assert r.returncode == 1 and "usage: python checkpoint.py weights" in r.stderr
    r = run("weights", "--out=weights")
    assert r.returncode == 2 and "unknown config key: out" in r.stderr

def test_unknown_format(tmp_path):
    (tmp_path / "x.txt").write_text("hello")
    _one_line_error(str(tmp_path / "x.txt"),
                    r"x.txt: unknown file format \(supported: an openai-whisper .pt")
    (tmp_path / "empty").mkdir()
    _one_line_error(str(tmp_path / "empty"), r"empty: directory holds no model.bin")

# -----------------------------------------------------------------------------
# tokenizer

def _strings():
    rng = random.Random(0)
    base = ["Hello, world!", " The quick brown fox jumps over the lazy dog.",
            "I'm here; you're there. We'll see!", "它是一个很好的模型。",
            "北京欢迎你",
            "  multiple   spaces\tand\ttabs\n\nnewlines ", "Émigré café naïve façade",
            "🎉🎉 party 🥳", "♪♪ la la ♪", "[MUSIC] (applause) <<quiet>> -- what?",
            "1234567890 3.14159 1,000,000", "e-mail: someone@example.com #hashtag",
            "日本語のテキストです", "Привет, мир", "مرحبا بالعالم",
            "'s 't 're 've 'm 'll 'd", "\"quoted\" `backtick` {braces} |pipe| ~tilde~",
            "😀😃😄😁😆😅🤣😂🙂🙃", "한국어 문장입니다.", "tab\tend\t"]
    alphabet = ("abcdefghijklmnopqrstuvwxyz ABCXYZ ,.!?'-\"()[]♪"
                "的是了我不人在他有这你们中国😀🎵éàüñ0123456789\n\t")
    out = list(base)
    for _ in range(300):
        out.append("".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40))))
    return out

@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_tokenizer_equals_tokenizers_package(weights, name):
    tokenizers = pytest.importorskip("tokenizers")
    ref = tokenizers.Tokenizer.from_file(os.path.join(weights, name, "tokenizer.json"))
    tok = tokenizer_io.load_tokenizer(os.path.join(weights, name))
    for s in _strings():
        ids = tok.encode(s)
        assert ids == ref.encode(s, add_special_tokens=False).ids, s
        assert tok.decode(ids) == ref.decode(ids) == s
    ids = tok.encode(" hello")
    assert tok.decode(tok.sot_sequence() + ids + [tok.eot]) == " hello"

@pytest.mark.parametrize("name,vocab", [("tiny.en", "vocabulary.txt"), ("base", "vocabulary.json")])
def test_tokenizer_from_vocabulary_and_tiktoken(weights, tmp_path, name, vocab):
    tok = tokenizer_io.load_tokenizer(os.path.join(weights, name))
    other = tokenizer_io.load_tokenizer(os.path.join(weights, name, vocab))
    assert other.specials == {k: v for k, v in tok.specials.items()} and other.ranks == tok.ranks
    lines = [f"{tokenizer_io.base64.b64encode(t).decode()} {r}" for t, r in tok.ranks.items()]
    (tmp_path / "x.tiktoken").write_text("\n".join(lines) + "\n")
    tk = tokenizer_io.load_tokenizer(str(tmp_path / "x.tiktoken"), n_vocab=tok.n_vocab)
    assert ((tk.eot, tk.sot, tk.sot_sequence(), tk.suppress) ==
            (tok.eot, tok.sot, tok.sot_sequence(), tok.suppress))

def test_tokenizer_to_dict(weights):
    tok = tokenizer_io.load_tokenizer(os.path.join(weights, "base"), language="zh")
    d = pickle.loads(pickle.dumps(tok.to_dict()))
    assert d["kind"] == "whisper"
    for back in (tokenizer_io.WhisperTokenizer.from_dict(d), tokenizer_io.tokenizer_from_dict(d)):
        for attr in ("eot", "sot", "n_vocab", "suppress", "suppress_blank", "specials"):
            assert getattr(back, attr) == getattr(tok, attr)
        assert back.sot_sequence() == tok.sot_sequence() == [50258, 50260, 50359, 50363]
        assert back.encode("你好 world") == tok.encode("你好 world")

def test_languages_list():
    whisper = pytest.importorskip("whisper")
    assert tokenizer_io.LANGUAGES == list(whisper.tokenizer.LANGUAGES)

# -----------------------------------------------------------------------------
# student

def test_spaced_layers():
    assert student_io.spaced_layers(6, 2) == [0, 5]
    assert student_io.spaced_layers(32, 2) == [0, 31]
    assert student_io.spaced_layers(4, 4) == [0, 1, 2, 3]
    assert student_io.spaced_layers(6, 3) == [0, 2, 5]

def test_make_student(tiny):
    model, tok = tiny
    student = student_io.make_student(model, n_decoder_layers=2)
    s, t = student.state_dict(), model.state_dict()
    assert all(torch.equal(v, t[k]) for k, v in s.items() if k.startswith("encoder."))
    assert torch.equal(s["decoder.blocks.1.mlp.0.weight"], t["decoder.blocks.3.mlp.0.weight"])
    assert torch.equal(s["decoder.token_embedding.weight"], t["decoder.token_embedding.weight"])
    assert not any(p.requires_grad for p in student.encoder.parameters())
    assert all(p.requires_grad for p in student.decoder.parameters())
    assert student.dims.n_text_layer == 2 and student.dims.n_audio_layer == model.dims.n_audio_layer
    small = student_io.make_student(model, n_decoder_layers=1, n_encoder_layers=2,
                                    freeze_encoder=False)
    assert small.dims.n_audio_layer == 2
    assert torch.equal(small.state_dict()["encoder.blocks.1.attn.query.weight"],
                       t["encoder.blocks.3.attn.query.weight"])
    xa = student.encoder(torch.randn(2, 80, 200))
    tokens = generate(student, xa, tok.sot_sequence(), tok.eot, max_new_tokens=5,
                      suppress=tok.suppress, suppress_blank=tok.suppress_blank).tokens
    assert len(tokens) == 2 and all(len(x) <= 5 for x in tokens)

# -----------------------------------------------------------------------------
# greedy transcripts identical to faster-whisper (CTranslate2, float32)

SENTENCES = [
    "the quick brown fox jumps over the lazy dog", "she sells sea shells by the sea shore",
    "please call stella and ask her to bring these things",
    "the weather today is sunny with a light breeze",
    "i would like a cup of coffee with milk", "turn left at the next traffic light",
    "the meeting has been moved to thursday afternoon", "how much does this book cost",
    "we are going to the beach this weekend", "my favourite colour is blue",
    "the train to london leaves at seven", "can you help me find my keys",
    "there are twelve months in a year", "the cat is sleeping on the sofa",
    "open the window and let some fresh air in", "he plays the guitar every evening",
    "the library closes at nine tonight", "do not forget to water the plants",
    "our team won the football match yesterday", "thank you very much for your help",
    "the children are playing in the garden", "it is raining again in the city",
]

def _espeak_audio(directory, sentences):
    from faster_whisper.audio import decode_audio
    out = []
    for i, s in enumerate(sentences):
        path = os.path.join(directory, f"s{i}.wav")
        voice = ["en-us", "en", "en-us+f3", "en+m3"][i % 4]
        speed = str(150 + 10 * (i % 3))
        subprocess.run(["espeak-ng", "-v", voice, "-s", speed, "-w", path, s], check=True)
        out.append(decode_audio(path, sampling_rate=16000))
    return out

def _fw_features(audio):
    """The encoder input faster-whisper builds for a clip under 30 s: its own log-mel (160 samples
    of padding), the last frame dropped, then zero-padded to 3000 frames."""
    from faster_whisper.feature_extractor import FeatureExtractor
    feats = FeatureExtractor(feature_size=80)(audio)[:, :-1]
    return torch.from_numpy(np.pad(feats, ((0, 0), (0, 3000 - feats.shape[1]))))

def faster_whisper_transcripts(model_dir, audios, language="en", beam_size=1):
    from faster_whisper import WhisperModel
    fw = WhisperModel(model_dir, device="cpu", compute_type="float32", cpu_threads=2)
    texts = []
    for audio in audios:
        segments, _ = fw.transcribe(audio, language=language, beam_size=beam_size,
                                    temperature=0.0, condition_on_previous_text=False,
                                    without_timestamps=True, vad_filter=False)
        texts.append("".join(s.text for s in segments).strip())
    return texts

def our_transcripts(model, tok, audios, language="en", batch_size=8, beam_size=1, ids=None):
    texts = []
    decode = generate if beam_size == 1 else partial(beam_search, beam_size=beam_size)
    for i in range(0, len(audios), batch_size):
        mel = torch.stack([_fw_features(a) for a in audios[i:i + batch_size]])
        with torch.no_grad():
            # CTranslate2 decodes at most min(448 // 2, 448 - prompt) steps
            tokens = decode(model, model.encoder(mel), tok.sot_sequence(language), tok.eot,
                            max_new_tokens=224, suppress=tok.suppress,
                            suppress_blank=tok.suppress_blank).tokens
        texts += [tok.decode(t).strip() for t in tokens]
        if ids is not None:
            ids += tokens
    return texts

@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_greedy_matches_faster_whisper(weights, tmp_path, name):
    pytest.importorskip("faster_whisper")
    audios = _espeak_audio(str(tmp_path), SENTENCES)
    model_dir = os.path.join(weights, name)
    model, tok = checkpoint.load_whisper(model_dir)
    torch.set_num_threads(2)
    ids = []
    ours = our_transcripts(model, tok, audios, ids=ids)
    ref = faster_whisper_transcripts(model_dir, audios)
    assert ours == ref
    # training targets (encode_text of a stripped transcript, as TD and SFT make them) are the
    # tokens Whisper emits, starting with a space: without it a student learns a first token the
    # teacher gives ~0 probability
    assert all(tok.decode(t[:1]).startswith(" ") for t in ids)
    assert sum(tok.encode_text(text) == t for text, t in zip(ours, ids)) >= 0.9 * len(ids)

@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_beam5_mostly_matches_faster_whisper(weights, tmp_path, name):
    """Beam search ranks finished hypotheses like CTranslate2 (sum log-prob / length) but prunes
    in its own order, so the issue asks for agreement on at least 90% of utterances, not all."""
    pytest.importorskip("faster_whisper")
    audios = _espeak_audio(str(tmp_path), SENTENCES)
    model_dir = os.path.join(weights, name)
    model, tok = checkpoint.load_whisper(model_dir)
    torch.set_num_threads(2)
    ours = our_transcripts(model, tok, audios, beam_size=5)
    ref = faster_whisper_transcripts(model_dir, audios, beam_size=5)
    agree = sum(a == b for a, b in zip(ours, ref)) / len(ref)
    print(f"{name}: beam 5 agreement {agree:.0%} on {len(ref)} utterances")
    assert agree >= 0.9, list(zip(ours, ref))

def test_openai_whisper_transcribes_exported_pt_like_us(tiny, tmp_path):
    """The exported .pt in openai-whisper's own decoding gives our greedy transcript."""
    whisper = pytest.importorskip("whisper")
    import data
    model, tok = tiny
    path = str(tmp_path / "tiny.en.pt")
    checkpoint.save_pt(model, path, tok)
    ref = whisper.load_model(path, device="cpu")
    wav = str(tmp_path / "fox.wav")
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", wav,
                    "the quick brown fox jumps over the lazy dog"], check=True)
    audio = data.load_audio(wav)
    mel = whisper.log_mel_spectrogram(torch.from_numpy(audio), padding=whisper.audio.N_SAMPLES)
    mel = whisper.pad_or_trim(mel[:, :mel.shape[-1] - 3000], 3000)  # transcribe()'s window
    options = whisper.DecodingOptions(language="en", without_timestamps=True, fp16=False)
    theirs = whisper.decode(ref, mel, options).text
    with torch.no_grad():
        xa = model.encoder(data.whisper_mel(audio)[None])
        ours = generate(model, xa, tok.sot_sequence(), tok.eot, max_new_tokens=224,
                        suppress=tok.suppress, suppress_blank=tok.suppress_blank).tokens
    assert tok.decode(ours[0]).strip() == theirs.strip()
    assert "the quick" in theirs.lower() and "over the lazy" in theirs.lower()  # speech, heard

# -----------------------------------------------------------------------------
# evaluate.py's own path (its CLI, data.whisper_mel, decode) against transcribe() in faster-whisper
# and openai-whisper: the log-mel of the clip, zero-padded to 3000 frames

PARITY = [
    "the postman left a parcel on the doorstep", "a flock of geese flew over the frozen pond",
    "turn the music down before the neighbours complain", "the kettle is boiling in the kitchen",
    "her grandfather told stories about the war", "we missed the last train and walked home",
    "the printer has run out of paper again", "a red fox crossed the road at dawn",
    "the soup needs a little more pepper", "they are painting the fence white this summer",
    "the baby fell asleep in the back of the car", "my sister collects old coins from abroad",
    "the waiter brought us the wrong dessert", "strong winds closed the bridge this morning",
    "the garden looks lovely after the rain", "please send me the report by friday",
    "a crowd gathered to watch the street musician", "the dentist said my teeth are healthy",
    "he lost his wallet somewhere in the park", "the lamp in the hallway keeps flickering",
]

def _speak(path, text, i):
    voice, speed = ["en-us", "en", "en-us+f3", "en+m3"][i % 4], str(140 + 10 * (i % 3))
    subprocess.run(["espeak-ng", "-v", voice, "-s", speed, "-w", str(path), text], check=True)
    return str(path)

def test_whisper_mel_is_transcribes_input(tmp_path):
    """data.whisper_mel is the encoder input of openai-whisper's transcribe() (its 30-s windows
    of a longer clip too) and, up to float32 rounding, faster-whisper's."""
    whisper = pytest.importorskip("whisper")
    from faster_whisper.feature_extractor import FeatureExtractor
    import data
    audio = data.load_audio(_speak(tmp_path / "a.wav", PARITY[0], 0))
    for clip in (audio, np.concatenate([audio] * 14)):  # ~2.5 s and ~35 s
        mel = whisper.log_mel_spectrogram(torch.from_numpy(clip), padding=whisper.audio.N_SAMPLES)
        content = mel.shape[-1] - 3000  # transcribe()'s content_frames
        ours = data.whisper_mel(clip, n_frames=None)
        assert ours.shape[1] == content and torch.equal(ours, mel[:, :content])
        assert torch.equal(data.whisper_mel(clip), whisper.pad_or_trim(mel[:, :content], 3000))
    fw = torch.from_numpy(FeatureExtractor(feature_size=80)(audio)[:, :-1])
    assert (data.whisper_mel(audio)[:, :fw.shape[1]] - fw).abs().max() < 1e-4
    assert (data.whisper_mel(audio)[:, fw.shape[1]:] == 0).all()
    mel, pad, n = data.utterance_mel(audio, n_frames=3000)  # what data.Batches pads for training
    assert pad == 0.0 and n == mel.shape[1] == len(audio) // 160
    assert torch.equal(mel, data.whisper_mel(audio)[:, :n])

@pytest.mark.slow
@pytest.mark.parametrize("name", ["tiny.en", "base"])
def test_evaluate_cli_matches_transcribe(weights, tmp_path, name):
    """python evaluate.py on Whisper weights gives the transcripts of faster-whisper's and
    openai-whisper's transcribe() (greedy, temperature 0, no timestamps, no previous text); the
    references get the same 16-kHz samples (data.load_audio)."""
    whisper = pytest.importorskip("whisper")
    pytest.importorskip("faster_whisper")
    import data
    rows = [{"audio": _speak(tmp_path / f"p{i}.wav", s, i), "text": s}
            for i, s in enumerate(PARITY)]
    data.write_manifest(tmp_path / "parity.jsonl", rows)
    model_dir, out = os.path.join(weights, name), tmp_path / "results.json"
    p = subprocess.run([sys.executable, "evaluate.py", f"--ckpt={model_dir}", "--language=en",
                        f"--manifest={tmp_path / 'parity.jsonl'}", f"--out={out}",
                        "--device=cpu", "--batch_size=10"], cwd=ROOT, capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    ours = [u["hyp"] for u in json.loads(out.read_text())["utts"]]
    torch.set_num_threads(2)
    audios = [data.load_audio(r["audio"]) for r in rows]
    assert ours == faster_whisper_transcripts(model_dir, audios)
    model, tok = checkpoint.load_whisper(model_dir)
    checkpoint.save_pt(model, str(tmp_path / "m.pt"), tok)
    ref = whisper.load_model(str(tmp_path / "m.pt"), device="cpu")
    theirs = [whisper.transcribe(ref, a, language="en", temperature=0.0, fp16=False,
                                 without_timestamps=True, condition_on_previous_text=False)
              ["text"].strip() for a in audios]
    assert ours == theirs
