"""demo.py's scoring helpers: Whisper's compression-ratio fallback decodes again only the transcripts that loop."""
import os

import torch

import data
import demo
from model import ModelDimensions, Whisper

def test_fallback_redecodes_only_looping_transcripts(tiny_corpus, tiny_tokenizer):
    rows = data.read_manifest(os.path.join(tiny_corpus, 'test.jsonl'))[:2]
    torch.manual_seed(0)
    model = Whisper(ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=4, n_audio_layer=1,
                                    n_vocab=tiny_tokenizer.n_vocab, n_text_ctx=40, n_text_state=64, n_text_head=4,
                                    n_text_layer=1)).eval()
    calls = []
    def cache(mel, paths):  # stands in for the encoder cache: one fixed encoder output per file
        calls.append(list(paths))
        return torch.stack([torch.randn(1500, 64, generator=torch.Generator().manual_seed(len(p))) for p in paths])
    loop = ' '.join(['the cat'] * 12)
    assert demo.compression_ratio(rows[0]['text']) <= 2.4 < demo.compression_ratio(loop)
    out, redone = demo.fallback(model, tiny_tokenizer, rows, cache, [rows[0]['text'], loop])
    assert redone == 1 and {tuple(c) for c in calls} == {(rows[1]['audio'],)}  # only the looping one
    assert out[0] == rows[0]['text'] and out[1] != loop
    assert demo.compression_ratio(out[1]) <= 2.4  # a sampled transcript that does not loop replaced it

def test_dev_split_is_its_own_and_big_enough():
    """The demo's dev sentences (their own corpus, synth.py's skip) are in none of the corpora it
    trains and tests on: not the Whisper rows', not the audio-LLM rows'; 150 of them."""
    import numpy as np
    import synth
    cfg, rng = demo.FULL, lambda: np.random.default_rng(demo.CORPUS_SEED)
    main = synth.corpus_texts('fortunes', cfg['n_labeled'] + cfg['n_unlabeled'], cfg['n_val'],
                              cfg['n_test'], rng())
    ark = synth.corpus_texts('fortunes', cfg['ark_n_train'], cfg['n_val'], cfg['n_test'], rng())
    dev = synth.corpus_texts('fortunes', 0, cfg['n_dev'], 0, rng(), cfg['dev_skip'])
    assert len(set(dev['val'])) == cfg['n_dev'] >= 150 and not dev['test'] + dev['train']
    assert ark['test'] == main['test'] and len(set(main['test'])) == cfg['n_test']
    used = {t for c in (main, ark) for split in c.values() for t in split}
    assert not set(dev['val']) & used
    # the skip is tight: one sentence fewer and dev would take the audio-LLM's last train sentence
    tight = synth.corpus_texts('fortunes', 0, cfg['n_dev'], 0, rng(), cfg['dev_skip'] - 1)
    assert tight['val'][0] == ark['train'][-1]
