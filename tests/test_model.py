"""model.py: KV cache, batched decoding and beam search agree with the slow, obvious ways."""
import os
import torch
import pytest

from decoding import beam_search, generate
from model import Whisper, ModelDimensions

EOT_BIAS = 6.0  # with tiny_model(eot_bias=EOT_BIAS), some utterances below reach EOT, others not

def tiny_model(seed=0, n_vocab=50, eot_bias=0.0):
    torch.manual_seed(seed)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=100, n_audio_state=64, n_audio_head=4,
                           n_audio_layer=2, n_vocab=n_vocab, n_text_ctx=40, n_text_state=64,
                           n_text_head=4, n_text_layer=2)
    model = Whisper(dims).eval()
    for p in model.parameters():  # above the init's 0.02: peaked outputs, non-trivial decoding
        p.data.normal_(0, 0.5)
    if eot_bias:  # the final LayerNorm's bias raises EOT's (id 0) logit by eot_bias everywhere
        with torch.no_grad():
            w = model.decoder.token_embedding.weight[0]
            model.decoder.ln.bias += eot_bias * w / w.dot(w)
    return model

def test_state_dict_names_match_openai_whisper():
    whisper = pytest.importorskip("whisper")
    dims = dict(n_mels=80, n_audio_ctx=100, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                n_vocab=50, n_text_ctx=40, n_text_state=64, n_text_head=4, n_text_layer=2)
    ours = Whisper(ModelDimensions(**dims)).state_dict()
    ref = whisper.model.Whisper(whisper.model.ModelDimensions(**dims))
    theirs = ref.state_dict()
    assert set(ours) == set(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    # same weights give the same logits
    ref.load_state_dict(tiny_model().state_dict())
    mel, tokens = torch.randn(2, 80, 200), torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        torch.testing.assert_close(tiny_model()(mel, tokens), ref(mel, tokens), atol=1e-4,
                                   rtol=1e-4)

def test_kv_cache_equals_full_recomputation():
    model = tiny_model()
    xa = model.encoder(torch.randn(3, 80, 150))
    tokens = torch.randint(0, 50, (3, 12))
    with torch.no_grad():
        full = model.decoder(tokens, xa)
        cache = {}
        parts = [model.decoder(tokens[:, :5], xa, cache), model.decoder(tokens[:, 5:8], xa, cache)]
        parts += [model.decoder(tokens[:, i:i + 1], xa, cache) for i in range(8, 12)]
    assert (torch.cat(parts, dim=1) - full).abs().max() < 1e-5

def test_encoder_takes_any_length_up_to_its_context():
    model = tiny_model()
    for frames in (1, 37, 200):
        assert model.encoder(torch.randn(1, 80, frames)).shape == (1, (frames + 1) // 2, 64)
    with pytest.raises(AssertionError, match="audio too long"):
        model.encoder(torch.randn(1, 80, 202))

def test_batched_greedy_equals_one_at_a_time_and_beam1():
    model = tiny_model(eot_bias=EOT_BIAS)
    xa = model.encoder(torch.randn(4, 80, 120))
    out = generate(model, xa, [1, 2], eot=0, max_new_tokens=20)
    assert any(len(t) > 3 for t in out.tokens)
    assert any(out.ended) and not all(out.ended)  # both the EOT and the length-bound exits
    for b in range(4):
        one = generate(model, xa[b:b + 1], [1, 2], eot=0, max_new_tokens=20)
        assert one.tokens[0] == out.tokens[b] and one.ended[0] == out.ended[b]
        assert one.logprobs[0] == pytest.approx(out.logprobs[b], abs=1e-4)
    beam = beam_search(model, xa, [1, 2], eot=0, beam_size=1, max_new_tokens=20)
    assert beam.tokens == out.tokens and beam.ended == out.ended

def test_batched_beam_search_equals_one_at_a_time():
    model = tiny_model(eot_bias=EOT_BIAS)
    xa = model.encoder(torch.randn(4, 80, 120))
    kw = dict(eot=0, beam_size=3, max_new_tokens=10, suppress_blank=[0])
    out = beam_search(model, xa, [1, 2], **kw)
    assert any(out.ended) and not all(out.ended)
    for b in range(4):
        one = beam_search(model, xa[b:b + 1], [1, 2], **kw)
        assert one.tokens[0] == out.tokens[b] and one.ended[0] == out.ended[b]
        assert one.logprobs[0] == pytest.approx(out.logprobs[b], abs=1e-4)

def test_greedy_logprobs_and_suppression():
    model = tiny_model()
    xa = model.encoder(torch.randn(2, 80, 120))
    out = generate(model, xa, [1, 2], eot=0, max_new_tokens=10, suppress=[36, 13],
                   suppress_blank=[10])
    tokens, logprobs = out.tokens, out.logprobs
    assert all(t not in (36, 13) for seq in tokens for t in seq)
    assert all(seq[0] != 10 for seq in tokens if seq)
    # the returned log-probabilities are those of a full recomputation under the same masking
    with torch.no_grad():
        seq = tokens[0]
        logits = model.decoder(torch.tensor([[1, 2] + seq]), xa[:1])[0, 1:-1].float()
    logits[:, [36, 13]] = float('-inf')
    logits[0, 10] = float('-inf')
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq)[:, None]).squeeze(1)
    assert ref.tolist() == pytest.approx(logprobs[0], abs=1e-4)

def test_beam_search_finds_a_better_sequence_than_greedy():
    model = tiny_model(seed=3)
    xa = model.encoder(torch.randn(3, 80, 120))
    greedy, lp = generate(model, xa, [1, 2], eot=0, max_new_tokens=12)[:2]
    beam, scores = beam_search(model, xa, [1, 2], eot=0, beam_size=4, max_new_tokens=12,
                               length_penalty=0.0)[:2]
    # with length_penalty 0 the ranking is by total log-probability, so beam does as well or better
    # whenever both end at the same maximum length or both finish
    for b in range(3):
        assert scores[b][0] >= sum(lp[b]) - 1e-4 or len(greedy[b]) < len(beam[b])

def test_max_lens_bounds_each_rollout():
    model = tiny_model()
    xa = model.encoder(torch.randn(3, 80, 120))
    tokens = generate(model, xa, [1, 2], eot=0, max_new_tokens=20, max_lens=[1, 3, 20]).tokens
    assert len(tokens[0]) <= 1 and len(tokens[1]) <= 3

def test_topk_ids_cover_every_step_and_eot():
    model = tiny_model(eot_bias=EOT_BIAS)
    xa = model.encoder(torch.randn(4, 80, 120))
    out = generate(model, xa, [1, 2], eot=0, max_new_tokens=20, topk=3)
    assert any(out.ended) and not all(out.ended)
    assert generate(model, xa, [1, 2], eot=0, max_new_tokens=20).top_ids is None
    for t, e, ids in zip(out.tokens, out.ended, out.top_ids):
        assert ids.shape == (len(t) + e, 3)
        assert ids[:, 0].tolist() == t + [0] * e  # greedy: the top-1 id is the token taken

def test_precomputed_cross_kv_decodes_the_same():
    model = tiny_model()
    with torch.no_grad():
        xa = model.encoder(torch.randn(3, 80, 120))
        kv = model.decoder.cross_kv(xa)
    plain = generate(model, xa, [1, 2], eot=0, max_new_tokens=10)
    given = generate(model, xa, [1, 2], eot=0, max_new_tokens=10, kv_cache=kv)
    assert given.tokens == plain.tokens
    assert torch.allclose(torch.tensor(given.logprobs), torch.tensor(plain.logprobs))
    assert len(kv) == len(model.decoder.blocks)  # the caller's dict gets no self-attention entries
    tokens = torch.tensor([[1, 2] + given.tokens[0]] * 3)
    w16 = model.decoder.token_embedding.weight.detach().to(torch.bfloat16)  # bf16, as rollouts use
    full, fast = model.decoder(tokens, xa), model.decoder(tokens, xa, project=w16)
    assert fast.dtype == torch.float32 and not torch.equal(fast, full)
    torch.testing.assert_close(fast, full, atol=0.02 * full.abs().max().item(), rtol=0)

def test_sampling_is_seeded_and_top_p_small_equals_greedy():
    model = tiny_model()
    xa = model.encoder(torch.randn(2, 80, 120))
    g = lambda: torch.Generator().manual_seed(5)
    sample = lambda **kw: generate(model, xa, [1, 2], eot=0, max_new_tokens=10, **kw).tokens
    a = sample(temperature=1.0, generator=g())
    b = sample(temperature=1.0, generator=g())
    assert a == b
    greedy = sample()
    nucleus = sample(temperature=1.0, top_p=1e-6, generator=g())
    assert nucleus == greedy

@pytest.mark.parametrize("conv_stride", [2, 4])
def test_padding_mask_makes_each_clip_independent_of_its_batch(conv_stride):
    """Mels padded to the longest (with any value) and masked: every clip's encoder output, logits,
    greedy and beam transcripts equal what it gets alone, unpadded."""
    from model import length_mask
    torch.manual_seed(0)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=100, n_audio_state=64, n_audio_head=4,
                           n_audio_layer=2, n_vocab=50, n_text_ctx=40, n_text_state=64,
                           n_text_head=4, n_text_layer=2, conv_stride=conv_stride)
    model = Whisper(dims).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.5)
    lens = torch.tensor([37, 200, 101, 6])
    mels = [torch.randn(80, int(n)) for n in lens]
    batch = torch.full((4, 80, 200), 3.0)
    for b, m in enumerate(mels):
        batch[b, :, :m.shape[1]] = m
    mask = length_mask(lens, 200)
    tokens = torch.randint(0, 50, (4, 5))
    with torch.no_grad():
        xa, xm = model.encoder(batch, mask), model.encoder.frames_mask(mask)
        logits = model(batch, tokens, mask)
        greedy = generate(model, xa, [1, 2], 0, max_new_tokens=8, xa_mask=xm).tokens
        beam = beam_search(model, xa, [1, 2], 0, beam_size=3, max_new_tokens=8, xa_mask=xm).tokens
        unmasked = generate(model, xa, [1, 2], 0, max_new_tokens=8).tokens
        for b, m in enumerate(mels):
            alone = model.encoder(m[None])
            torch.testing.assert_close(xa[b, :alone.shape[1]], alone[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(logits[b], model(m[None], tokens[b:b + 1])[0], atol=1e-5,
                                       rtol=1e-5)
            assert greedy[b] == generate(model, alone, [1, 2], 0, max_new_tokens=8).tokens[0]
            assert beam[b] == beam_search(model, alone, [1, 2], 0, beam_size=3,
                                          max_new_tokens=8).tokens[0]
    assert unmasked != greedy  # without the mask the padding changes the transcripts
    assert length_mask(torch.tensor([200, 200]), 200) is None  # nothing padded: no mask at all

def test_imports_flow_one_way():
    """model.py imports nothing of the project; no module of the project imports one above it."""
    import ast
    import glob
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    mods = {os.path.basename(f)[:-3] for f in glob.glob(os.path.join(root, '*.py'))}
    deps = {}
    for m in mods:
        tree = ast.parse(open(os.path.join(root, m + '.py')).read())
        deps[m] = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
                   if a.name in mods}
        deps[m] |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
                    and n.module in mods}
    assert deps['model'] == set() and {'model', 'distill', 'train', 'common'} <= mods
    def below(m, path=()):
        assert m not in path, f"import cycle: {' -> '.join(path + (m,))}"
        return set().union(*[{d} | below(d, path + (m,)) for d in deps[m]]) if deps[m] else set()
    for m in mods:
        below(m)

def test_core_files_stay_small():
    """The six core files read in one sitting: at most 2,200 lines, none over 100 characters."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    core = ['model', 'data', 'train', 'distill', 'evaluate', 'configurator']
    lines = {m: open(os.path.join(root, m + '.py')).read().splitlines() for m in core}
    assert sum(map(len, lines.values())) <= 2200
    long = [(m, i + 1) for m, ls in lines.items() for i, line in enumerate(ls) if len(line) > 100]
    assert not long, f"lines over 100 characters: {long}"
