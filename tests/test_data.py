import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from data import (Batches, SAMPLE_RATE, aishell_manifest,
                  librispeech_manifest, load_audio, log_mel_spectrogram, mel_filters, read_manifest,
                  resample, utterance_mel, whisper_mel, write_manifest)
from tokenizer import SentencePieceTokenizer, tokenizer_from_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------- audio

@pytest.mark.parametrize('sr', [8000, 22050, 44100, 48000])
def test_resample_keeps_sine(sr):
    n = int(1.3 * sr)
    x = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(n) / sr).astype(np.float32)
    y = resample(x, sr)
    assert y.dtype == np.float32 and len(y) == round(n * SAMPLE_RATE / sr)
    ref = 0.5 * np.sin(2 * np.pi * 1000 * np.arange(len(y)) / SAMPLE_RATE)
    assert np.abs(y - ref)[800:-800].max() < 1e-2  # same frequency, phase, amplitude (off edges)

def test_resample_removes_aliases():
    sr = 44100
    t = np.arange(sr) / sr
    sine = lambda f: np.sin(2 * np.pi * f * t).astype(np.float32)
    above = resample(sine(11000), sr)  # above the new Nyquist: must vanish
    below = resample(sine(6000), sr)   # in the pass band: must stay
    assert np.sqrt(np.mean(above[800:-800] ** 2)) < 1e-3
    assert abs(np.sqrt(2 * np.mean(below[800:-800] ** 2)) - 1) < 1e-2

def test_load_audio_mono_mixdown_and_resample(tmp_path):
    t = np.arange(16000) / 16000
    left, right = 0.5 * np.sin(2 * np.pi * 440 * t), np.full_like(t, 0.1)
    sf.write(tmp_path / 'st.wav', np.stack([left, right], 1), 16000, subtype='FLOAT')
    np.testing.assert_allclose(load_audio(tmp_path / 'st.wav'), (left + right) / 2, atol=1e-6)
    sf.write(tmp_path / 'st48.flac', np.stack([left, right], 1).repeat(3, 0), 48000)
    assert len(load_audio(str(tmp_path / 'st48.flac'))) == 16000

def test_load_audio_errors(tmp_path):
    def err(path, **kw):
        with pytest.raises(ValueError) as e:
            load_audio(str(path), **kw)
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and '\n' not in msg
        return msg
    assert 'file not found' in err(tmp_path / 'missing.wav')
    (tmp_path / 'text.wav').write_text('not audio at all')
    assert 'cannot read audio' in err(tmp_path / 'text.wav')
    sf.write(tmp_path / 'empty.wav', np.zeros(0, np.float32), 16000)
    assert 'empty audio' in err(tmp_path / 'empty.wav')
    sf.write(tmp_path / 'nan.wav', np.array([0.0, np.nan, 0.1], np.float32), 16000, subtype='FLOAT')
    assert 'NaN or inf' in err(tmp_path / 'nan.wav')
    sf.write(tmp_path / 'long.wav', np.zeros(16000, np.float32), 16000)
    assert 'more than max_seconds=0.5' in err(tmp_path / 'long.wav', max_seconds=0.5)
    sf.write(tmp_path / 'short.wav', np.zeros(200, np.float32), 16000)  # 12.5 ms: no stft frame
    assert '12.5 ms long, shorter than one 25-ms' in err(tmp_path / 'short.wav')

# ---------------------------------------------------------------------------- mel

@pytest.mark.parametrize('n_mels', [80, 128])
def test_mel_filters_match_whisper(n_mels):
    whisper = pytest.importorskip('whisper')
    ours, ref = mel_filters(n_mels), whisper.audio.mel_filters('cpu', n_mels)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max() < 1e-6

@pytest.mark.parametrize('n_mels', [80, 128])
def test_log_mel_matches_whisper(espeak_wav, n_mels):
    whisper = pytest.importorskip('whisper')
    audio = load_audio(espeak_wav)
    ref = whisper.log_mel_spectrogram(torch.from_numpy(audio), n_mels)
    for inp in (audio, torch.from_numpy(audio)):
        ours = log_mel_spectrogram(inp, n_mels)
        assert ours.shape == ref.shape == (n_mels, len(audio) // 160)
        assert (ours - ref).abs().max() < 1e-4
    # transcribe()'s window: the clip's own log-mel, zero-padded to 3000 frames
    mel = whisper.log_mel_spectrogram(torch.from_numpy(audio), n_mels, padding=whisper.audio.N_SAMPLES)
    ref30 = whisper.pad_or_trim(mel[:, :mel.shape[-1] - 3000], 3000)
    assert (whisper_mel(audio, n_mels) - ref30).abs().max() < 1e-4
    mel, pad, n = utterance_mel(audio, n_mels, n_frames=3000)  # short form, padded as Batches does
    assert pad == 0.0
    full = torch.full((n_mels, 3000), pad)
    full[:, :mel.shape[1]] = mel
    assert n == len(audio) // 160 and (full - ref30).abs().max() < 1e-4

# ---------------------------------------------------------------------------- manifests

def test_manifest_round_trip(tmp_path):
    (tmp_path / 'a').mkdir()
    rows = [dict(audio=str(tmp_path / 'a' / 'x.wav'), text='hello', duration=1.5, lang='en'),
            dict(audio=str(tmp_path / 'y.wav'), duration=2.0, lang='en')]  # unlabeled
    write_manifest(tmp_path / 'm' / 'm.jsonl', rows)
    first = json.loads((tmp_path / 'm' / 'm.jsonl').read_text().splitlines()[0])
    assert first['audio'] == os.path.join('..', 'a', 'x.wav')  # relative to the manifest
    assert read_manifest(tmp_path / 'm' / 'm.jsonl') == rows

@pytest.mark.parametrize('line,problem', [
    ('{"audio": "a.wav", "text": ', 'bad JSON'),
    ('{"text": "hi"}', 'missing "audio" field'),
    ('{"audio": 3}', 'field "audio" has type int'),
    ('{"audio": "a.wav", "text": ["x"]}', 'field "text" has type list'),
    ('{"audio": "a.wav", "duration": "2"}', 'field "duration" has type str'),
    ('["a.wav"]', 'expected a JSON object'),
])
def test_manifest_errors_name_the_line(tmp_path, line, problem):
    path = tmp_path / 'bad.jsonl'
    path.write_text('{"audio": "ok.wav"}\n\n' + line + '\n')
    with pytest.raises(ValueError) as e:
        read_manifest(path)
    assert str(e.value).startswith(f"{path}:3: ") and problem in str(e.value)

def test_librispeech_manifest(tmp_path):
    root = tmp_path / 'LibriSpeech' / 'test-clean'
    for spk, ch, n in (('19', '198', 2), ('26', '495', 1)):
        d = root / spk / ch
        d.mkdir(parents=True)
        lines = []
        for i in range(n):
            uid = f'{spk}-{ch}-{i:04d}'
            sf.write(d / f'{uid}.flac', np.zeros(1600 * (i + 1), np.float32), 16000)
            lines.append(f'{uid} HELLO WORLD NUMBER {i}')
        (d / f'{spk}-{ch}.trans.txt').write_text('\n'.join(lines) + '\n')
    rows = librispeech_manifest(str(root), str(tmp_path / 'ls.jsonl'))
    back = read_manifest(tmp_path / 'ls.jsonl')
    assert back == rows and len(rows) == 3
    assert rows[1] == dict(audio=str(root / '19' / '198' / '19-198-0001.flac'),
                           text='HELLO WORLD NUMBER 1', duration=0.2, lang='en')

def test_aishell_manifest(tmp_path):
    root = tmp_path / 'aishell'
    trans = []
    for split, spk in (('train', 'S0002'), ('dev', 'S0724'), ('test', 'S0764')):
        (root / 'wav' / split / spk).mkdir(parents=True)
        for i in range(2):
            uid = f'BAC009{spk}W{i:04d}'
            sf.write(root / 'wav' / split / spk / f'{uid}.wav', np.zeros(8000, np.float32),
                     16000)
            if not (split == 'dev' and i == 1):  # a wav without a transcript is skipped
                trans.append(f'{uid} 而 对 楼市 成交 {i}')
    (root / 'transcript').mkdir()
    (root / 'transcript' / 'aishell_transcript_v0.8.txt').write_text('\n'.join(trans) + '\n',
                                                                      encoding='utf-8')
    out = aishell_manifest(str(root), str(tmp_path / 'out'))
    assert {k: len(v) for k, v in out.items()} == dict(train=2, dev=1, test=2)
    test = read_manifest(tmp_path / 'out' / 'test.jsonl')
    assert test[1] == dict(audio=str(root / 'wav' / 'test' / 'S0764' / 'BAC009S0764W0001.wav'),
                           text='而对楼市成交1', duration=0.5, lang='zh')

# ---------------------------------------------------------------------------- tokenizer

def test_sentencepiece_round_trip(tiny_corpus, tiny_tokenizer):
    tok = tiny_tokenizer
    text = read_manifest(os.path.join(tiny_corpus, 'train.jsonl'))[0]['text']
    ids = tok.encode(text)
    assert all(0 <= i < tok.n_vocab for i in ids) and tok.sot not in ids and tok.eot not in ids
    assert tok.decode([tok.sot] + ids + [tok.eot]) == text
    assert tok.sot_sequence('en') == [tok.sot]
    assert tok.eot in tok.suppress_blank and tok.sot in tok.suppress
    tok2 = tokenizer_from_dict(pickle.loads(pickle.dumps(tok.to_dict())))
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids
    assert tok.to_dict()['kind'] == 'sentencepiece'
    assert tok2.encode(text) == ids and tok2.n_vocab == tok.n_vocab

def test_sentencepiece_bpe_and_chinese():
    texts = ['今天天气很好', '明天下雨', '天气不好'] * 5
    tok = SentencePieceTokenizer.train(texts, vocab_size=8, model_type='bpe')
    assert tok.decode(tok.encode('天气很好')) == '天气很好'

# ---------------------------------------------------------------------------- batches

def test_batches_tokens_and_targets(tiny_corpus, tiny_tokenizer):
    tok = tiny_tokenizer
    rows = read_manifest(os.path.join(tiny_corpus, 'train.jsonl'))[:4]
    rows[3] = {k: v for k, v in rows[3].items() if k != 'text'}  # unlabeled
    batch = next(iter(Batches(rows, tok, batch_size=4, shuffle=False)))
    assert batch['mel'].shape[:2] == (4, 80)
    assert batch['mel'].shape[2] == batch['mel_lengths'].max()
    for b, r in enumerate(rows):
        toks, tgts = batch['tokens'][b].tolist(), batch['targets'][b].tolist()
        if 'text' not in r:
            assert toks[0] == tok.sot and all(t == -100 for t in tgts)
            assert batch['text'][b] is None
            continue
        ids = tok.encode(r['text'])
        assert toks[:len(ids) + 1] == [tok.sot] + ids
        assert tgts[:len(ids) + 1] == ids + [tok.eot]
        assert all(t == -100 for t in tgts[len(ids) + 1:])
        n = batch['mel_lengths'][b]
        mel, pad, _ = utterance_mel(load_audio(r['audio']))
        assert torch.equal(batch['mel'][b, :, :n], mel) and (batch['mel'][b, :, n:] == pad).all()
    assert batch['audio'] == [r['audio'] for r in rows] and batch['index'] == [0, 1, 2, 3]

def test_batches_whisper_frames(tiny_corpus, tiny_tokenizer):
    rows = read_manifest(os.path.join(tiny_corpus, 'val.jsonl'))[:2]
    batch = next(iter(Batches(rows, tiny_tokenizer, batch_size=2, shuffle=False, n_frames=3000)))
    assert batch['mel'].shape == (2, 80, 3000)
    for b, r in enumerate(rows):
        assert (batch['mel'][b] - whisper_mel(load_audio(r['audio']))).abs().max() < 1e-4

def test_batches_deterministic_and_bucketed(tiny_corpus, tiny_tokenizer):
    rows = read_manifest(os.path.join(tiny_corpus, 'train.jsonl'))
    a = Batches(rows, tiny_tokenizer, batch_size=3, seed=7)
    b = Batches(rows, tiny_tokenizer, batch_size=3, seed=7)
    assert a.plan() == b.plan() and sorted(sum(a.plan(), [])) == list(range(12))
    a.set_epoch(1)
    assert a.plan() != b.plan() and a.plan() == b.plan(epoch=1)
    assert Batches(rows, tiny_tokenizer, batch_size=3, seed=8).plan() != b.plan()
    for batch in a.plan():  # one chunk here, so each batch holds consecutive durations
        d = sorted(r['duration'] for r in rows)
        bd = sorted(rows[i]['duration'] for i in batch)
        assert d.index(bd[-1]) - d.index(bd[0]) == len(bd) - 1 or len(set(d)) < len(d)

@pytest.mark.parametrize('batch_size,shuffle', [(3, True), (5, True), (4, False), (12, True)])
def test_batches_sharding(tiny_corpus, tiny_tokenizer, batch_size, shuffle):
    rows = read_manifest(os.path.join(tiny_corpus, 'train.jsonl'))
    plans = [Batches(rows, tiny_tokenizer, batch_size=batch_size, seed=1, rank=r, world_size=2,
                     shuffle=shuffle).plan() for r in range(2)]
    assert len(plans[0]) == len(plans[1]) > 0
    seen = [sorted(sum(p, [])) for p in plans]
    assert not set(seen[0]) & set(seen[1]) and sorted(seen[0] + seen[1]) == list(range(12))

# ---------------------------------------------------------------------------- command line

def test_cli(tmp_path):
    run = lambda script, *args: subprocess.run([sys.executable, script, *args], cwd=ROOT,
                                               capture_output=True, text=True)
    r = run('synth.py', f'--out={tmp_path / "c"}', '--text=grammar', '--n_train=2', '--n_val=1',
            '--n_test=1', '--workers=1')
    assert r.returncode == 0, r.stderr
    assert len(read_manifest(tmp_path / 'c' / 'train.jsonl')) == 2
    r = run('data.py', 'librispeech', str(tmp_path / 'none'), str(tmp_path / 'ls.jsonl'))
    assert r.returncode == 1 and 'no LibriSpeech transcripts' in r.stderr  # not an empty manifest
    assert not os.path.exists(tmp_path / 'ls.jsonl')
    r = run('synth.py', '--out=x', '--n_trian=2')
    assert r.returncode == 2 and 'unknown config key: n_trian' in r.stderr
    r = run('data.py', 'nothing')
    assert r.returncode == 1 and 'python data.py librispeech' in r.stderr
