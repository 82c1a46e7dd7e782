"""
Tokenizers, all with encode, decode, eot, sot, n_vocab, sot_sequence(language), suppress,
suppress_blank and to_dict (tokenizer_from_dict reads it back): SentencePieceTokenizer (a small one
trained for models from scratch), Whisper's byte-level BPE on tiktoken (WhisperTokenizer, read
from tokenizer.json, vocabulary.json/.txt or .tiktoken files), the audio-LLM's ChatTokenizer on top
of one, a GGUF chat LM's byte-level BPE (GGUFTokenizer: SmolLM2's), the map between two
vocabularies by token string (token_map), and tokenizer_from_dict (a checkpoint's).
"""
import base64
import io
import json
import os

import torch

from model import audio_tokens

LANGUAGES = ("en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da "
             "hu ta no th ur hr bg lt la mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne "
             "mn bs kk sq sw gl mr pa si km sn yo so af oc ka be tg sd gu am yi lo uz fo ht ps tk "
             "nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue").split()
N_TIMESTAMPS = 1501  # <|0.00|> .. <|30.00|>
PAT_STR = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""

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

class SentencePieceTokenizer:
    """A small SentencePiece model for models trained from scratch (bos <|startoftranscript|>, eos
    <|endoftext|>); no normalisation: decode(encode(s)) == s, lower-casing is the caller's."""

    def __init__(self, model_bytes):
        import sentencepiece as spm
        self.model_bytes = bytes(model_bytes)
        sp = self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.sot, self.eot, self.n_vocab = sp.bos_id(), sp.eos_id(), sp.get_piece_size()
        self.suppress = [self.sot, sp.unk_id()]
        blank = [i for i in sp.encode(' ') if not sp.is_control(i)] + [sp.piece_to_id('▁')]
        self.suppress_blank = sorted({i for i in blank if i != sp.unk_id()} | {self.eot})

    @classmethod
    def train(cls, texts, vocab_size=512, model_type='unigram'):
        import sentencepiece as spm
        texts = list(texts)
        n_chars = len(set(''.join(texts).replace(' ', '')))
        if n_chars + 4 > vocab_size:  # every character gets a piece (character_coverage=1)
            print(f"SentencePieceTokenizer: {n_chars} distinct characters, vocab_size raised from "
                  f"{vocab_size} to {n_chars + 64}")
            vocab_size = n_chars + 64
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size,
            model_type=model_type, character_coverage=1.0, normalization_rule_name='identity',
            hard_vocab_limit=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
            bos_piece='<|startoftranscript|>', eos_piece='<|endoftext|>', minloglevel=2,
            num_threads=1)
        return cls(buf.getvalue())

    def encode(self, text):
        return self.sp.encode(text)

    encode_text = encode  # a transcript as a training target (Whisper's tokenizer adds a space)

    def decode(self, ids):
        ids = [int(i) for i in ids]
        return self.sp.decode([i for i in ids if 0 <= i < self.n_vocab
                               and not self.sp.is_control(i)])

    def sot_sequence(self, language=None):
        return [self.sot]  # one language per model trained from scratch: no language token

    def to_dict(self):
        return {'kind': 'sentencepiece', 'model': self.model_bytes}

    def __reduce__(self):  # picklable (e.g. for DataLoader workers) through the serialized model
        return (SentencePieceTokenizer, (self.model_bytes,))

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

# the GGUF chat LM's pre-tokenizer, llama.cpp's "smollm" (llama-vocab.cpp): each digit alone, then
# GPT-2's regex on the text between digits; in one regex, a whitespace run also ends before a digit
SMOLLM_PAT_STR = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"""
                  r"""|\s+(?![^\s\p{N}])|\s+""")

class GGUFTokenizer:
    """A GGUF chat LM's byte-level BPE (SmolLM2's) on tiktoken, from the file's tokens and merges
    (checkpoint.load_gguf's metadata). Its control tokens (<|im_start|>, <|im_end|>,
    <|endoftext|>, ...) are encoded only where allowed_special names them; eot is <|im_end|>."""
    SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
            "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id")

    def __init__(self, meta):
        import tiktoken
        tokens, types = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.token_type"]
        if (meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")) != ("gpt2", "smollm"):
            raise ValueError(f"tokenizer {meta.get('tokenizer.ggml.model')!r}, pre-tokenizer "
                             f"{meta.get('tokenizer.ggml.pre')!r}: only gpt2 with smollm is read")
        byte_of = {c: b for b, c in bytes_to_unicode().items()}
        self.meta = {k: meta[k] for k in self.KEYS}  # what to_dict keeps
        self.n_vocab, ids = len(tokens), {t: i for i, t in enumerate(tokens)}
        self.specials = {t: i for i, t in enumerate(tokens) if types[i] == 3}  # 3: CONTROL
        self.ranks = {bytes(map(byte_of.get, t)): i for i, t in enumerate(tokens) if types[i] != 3}
        # tiktoken merges the pair that makes the lowest-ranked token first; the ranks are the ids,
        # so they must follow the merges' order
        merged = [ids[m.replace(" ", "")] for m in meta["tokenizer.ggml.merges"]]
        if merged != sorted(merged):
            raise ValueError("tokenizer.ggml.merges are not in the order of their tokens' ids")
        # bytes the vocabulary lacks (0xF5-0xFF, a few controls) get ids past it; encode drops them
        missing = [bytes([b]) for b in range(256) if bytes([b]) not in self.ranks]
        ranks = {**self.ranks, **{b: self.n_vocab + k for k, b in enumerate(missing)}}
        self.encoding = tiktoken.Encoding(name="gguf", pat_str=SMOLLM_PAT_STR,
                                          mergeable_ranks=ranks, special_tokens=self.specials)
        self.im_start, self.im_end = self.specials["<|im_start|>"], self.specials["<|im_end|>"]
        self.eot = meta["tokenizer.ggml.eos_token_id"]  # <|im_end|>: the end of a chat turn

    def encode(self, text, allowed_special=frozenset()):
        """allowed_special: the control tokens' names to encode as such, or "all"."""
        ids = self.encoding.encode(text, allowed_special=allowed_special, disallowed_special=())
        return [i for i in ids if i < self.n_vocab]

    def decode(self, ids):
        return self.encoding.decode([int(i) for i in ids])

    def chat_prompt(self, instruction, system=SYSTEM):
        """SmolLM2's ChatML prompt: a system turn, the user's instruction, the answer's start."""
        return self.encode(f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
                           f"{instruction}<|im_end|>\n<|im_start|>assistant\n",
                           allowed_special={"<|im_start|>", "<|im_end|>"})

    def to_dict(self):
        return {"kind": "gguf", "meta": self.meta}

class ChatMLTokenizer:
    """The pretrained chat LM student's tokenizer: the LM's own (a GGUFTokenizer) and three new
    tokens for the audio. Prompt, ChatML without a system turn (SmolLM2's template would add its
    default one: ~20 more tokens per clip that say nothing about audio):
    <|im_start|>user\n<|begin_of_audio|> <|audio|> x N <|end_of_audio|>Transcribe this audio.
    <|im_end|>\n<|im_start|>assistant\n, then the transcript and <|im_end|> (eot)."""
    AUDIO = ("<|audio|>", "<|begin_of_audio|>", "<|end_of_audio|>")
    INSTRUCTION = "Transcribe this audio."

    def __init__(self, base):
        self.base, self.n_base = base, base.n_vocab
        self.specials = {name: self.n_base + i for i, name in enumerate(self.AUDIO)}
        self.n_vocab = self.n_base + len(self.AUDIO)
        self.audio, self.boa, self.eoa = self.specials.values()
        chat = lambda text: base.encode(text, allowed_special={"<|im_start|>", "<|im_end|>"})
        self.head = chat("<|im_start|>user\n")
        self.tail = chat(f"{self.INSTRUCTION}<|im_end|>\n<|im_start|>assistant\n")
        self.sot, self.eot = self.head[0], base.eot
        self.control = set(base.specials.values()) | set(self.specials.values())
        self.suppress = sorted(self.control - {self.eot})
        self.suppress_blank = base.encode(" ") + [self.eot]

    def encode(self, text):
        return self.base.encode(text)

    def encode_text(self, text):
        """A transcript after a space, as Whisper writes it: the answer's first token is then the
        teacher's first token wherever the two vocabularies share it (" Why", not "Why")."""
        return self.base.encode(" " + text.strip())

    def decode(self, ids):
        return self.base.decode([i for i in ids if i not in self.control])

    def prompt(self, mel_frames=None):
        """The student's prompt for a clip of mel_frames real frames (None: no audio slots)."""
        n = 0 if mel_frames is None else audio_tokens(int(mel_frames))
        return self.head + [self.boa] + [self.audio] * n + [self.eoa] + self.tail

    def sot_sequence(self, language=None):
        return self.prompt()

    def to_dict(self):
        return {"kind": "chatml", "base": self.base.to_dict()}

def token_strings(tok):
    """Each id's exact token string, as bytes: what the text route maps vocabularies by."""
    if isinstance(tok, ChatTokenizer):
        return token_strings(tok.base)[:tok.n_base] + [n.encode() for n in tok.ROLES]
    if isinstance(tok, ChatMLTokenizer):
        return token_strings(tok.base) + [n.encode() for n in tok.AUDIO]
    if isinstance(tok, GGUFTokenizer):  # control tokens by their names, the rest by their bytes
        strings = [None] * tok.n_vocab
        for t, i in list(tok.ranks.items()) + [(n.encode(), i) for n, i in tok.specials.items()]:
            strings[i] = t
        return strings
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
    if d['kind'] == 'gguf':
        return GGUFTokenizer(d['meta'])
    if d['kind'] == 'chatml':
        return ChatMLTokenizer(tokenizer_from_dict(d['base']))
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
