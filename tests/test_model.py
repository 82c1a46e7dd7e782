"""model.py: KV cache, batched decoding and beam search agree with the slow, obvious computations."""
import torch
import pytest

from model import Whisper, ModelDimensions

def tiny_model(seed=0, n_vocab=50):
    torch.manual_seed(seed)
    dims = ModelDimensions(n_mels=80, n_audio_ctx=100, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
                           n_vocab=n_vocab, n_text_ctx=40, n_text_state=64, n_text_head=4, n_text_layer=2)
    model = Whisper(dims).eval()
    for p in model.parameters():  # larger than the init's 0.02, so the outputs are peaked and decoding is not trivial
        p.data.normal_(0, 0.5)
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
        torch.testing.assert_close(tiny_model()(mel, tokens), ref(mel, tokens), atol=1e-4, rtol=1e-4)

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
    model = tiny_model()
    xa = model.encoder(torch.randn(4, 80, 120))
    tokens, logprobs, ended = model.generate(xa, [1, 2], eot=0, max_new_tokens=20)
    assert any(len(t) > 3 for t in tokens)
    for b in range(4):
        t1, lp1, e1 = model.generate(xa[b:b + 1], [1, 2], eot=0, max_new_tokens=20)
        assert t1[0] == tokens[b] and e1[0] == ended[b]
        assert lp1[0] == pytest.approx(logprobs[b], abs=1e-4)
    beam_tokens, _, _ = model.beam_search(xa, [1, 2], eot=0, beam_size=1, max_new_tokens=20)
    assert beam_tokens == tokens

def test_greedy_logprobs_and_suppression():
    model = tiny_model()
    xa = model.encoder(torch.randn(2, 80, 120))
    tokens, logprobs, _ = model.generate(xa, [1, 2], eot=0, max_new_tokens=10, suppress=[36, 13], suppress_blank=[10])
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
    greedy, lp, _ = model.generate(xa, [1, 2], eot=0, max_new_tokens=12)
    beam, scores, _ = model.beam_search(xa, [1, 2], eot=0, beam_size=4, max_new_tokens=12, length_penalty=0.0)
    # with length_penalty 0 the ranking is by total log-probability, so beam can only do as well or better
    # whenever both end at the same maximum length or both finish
    for b in range(3):
        assert scores[b][0] >= sum(lp[b]) - 1e-4 or len(greedy[b]) < len(beam[b])

def test_max_lens_bounds_each_rollout():
    model = tiny_model()
    xa = model.encoder(torch.randn(3, 80, 120))
    tokens, _, ended = model.generate(xa, [1, 2], eot=0, max_new_tokens=20, max_lens=[1, 3, 20])
    assert len(tokens[0]) <= 1 and len(tokens[1]) <= 3

def test_precomputed_cross_kv_decodes_the_same():
    model = tiny_model()
    with torch.no_grad():
        xa = model.encoder(torch.randn(3, 80, 120))
        kv = model.decoder.cross_kv(xa)
    plain = model.generate(xa, [1, 2], eot=0, max_new_tokens=10)
    given = model.generate(xa, [1, 2], eot=0, max_new_tokens=10, kv_cache=kv)
    assert given[0] == plain[0] and torch.allclose(torch.tensor(given[1]), torch.tensor(plain[1]))
    assert len(kv) == len(model.decoder.blocks)  # the caller's dict is not filled with the self-attention entries
    tokens = torch.tensor([[1, 2] + given[0][0]] * 3)
    w16 = model.decoder.token_embedding.weight.detach().to(torch.bfloat16)  # a bf16 output embedding, as rollouts use
    full, fast = model.decoder(tokens, xa), model.decoder(tokens, xa, project=w16)
    assert fast.dtype == torch.float32 and not torch.equal(fast, full)
    torch.testing.assert_close(fast, full, atol=0.02 * full.abs().max().item(), rtol=0)

def test_sampling_is_seeded_and_top_p_small_equals_greedy():
    model = tiny_model()
    xa = model.encoder(torch.randn(2, 80, 120))
    g = lambda: torch.Generator().manual_seed(5)
    a = model.generate(xa, [1, 2], eot=0, max_new_tokens=10, temperature=1.0, generator=g())[0]
    b = model.generate(xa, [1, 2], eot=0, max_new_tokens=10, temperature=1.0, generator=g())[0]
    assert a == b
    greedy = model.generate(xa, [1, 2], eot=0, max_new_tokens=10)[0]
    nucleus = model.generate(xa, [1, 2], eot=0, max_new_tokens=10, temperature=1.0, top_p=1e-6, generator=g())[0]
    assert nucleus == greedy
