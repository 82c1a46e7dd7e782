"""
Files on disk to tensors in a batch: audio (a hand-written resampler), Whisper's log-mel, JSONL
manifests (+ LibriSpeech / AISHELL-1) and length-bucketed, DDP-sharded batches (synth.py makes a
corpus with espeak-ng; tokenizers are in tokenizer.py). Manifests from the layouts users have:
    python data.py librispeech /data/LibriSpeech/test-clean data/ls_test_clean.jsonl
    python data.py aishell /data/aishell data/aishell
"""
import glob
import json
import math
import os
import sys
from functools import lru_cache

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from torch.nn.utils.rnn import pad_sequence

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_SAMPLES = 30 * SAMPLE_RATE  # Whisper's 30 s window
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000
MIN_SECONDS = N_FFT / SAMPLE_RATE  # 25 ms: the shortest clip the log-mel takes (one window)

# -----------------------------------------------------------------------------
# audio

@lru_cache(maxsize=None)
def _sinc_filters(up, down, zeros=24, rolloff=0.945, beta=8.0):
    """Polyphase windowed-sinc taps (Kaiser window): row p interpolates at input offset p / up."""
    cutoff = min(1.0, up / down) * rolloff  # of the input Nyquist: anti-aliasing when down-sampling
    half = int(math.ceil(zeros / cutoff))  # filter half-width in input samples
    # (up, taps): each tap's distance from the wanted output time, in input samples
    x = np.arange(-half, half + 1)[None, :] - np.arange(up)[:, None] / up
    window = np.i0(beta * np.sqrt(np.clip(1 - (x / (half + 1)) ** 2, 0, 1))) / np.i0(beta)
    h = cutoff * np.sinc(cutoff * x) * window
    h /= h.sum(axis=1, keepdims=True)  # exact unit gain at DC for every phase
    return h.astype(np.float32), half

def resample(x, sr_in, sr_out=SAMPLE_RATE):
    """Band-limited resampling of a 1-D signal by sr_out / sr_in, to round(n * sr_out / sr_in)."""
    if sr_in == sr_out:
        return x.astype(np.float32)
    g = math.gcd(int(sr_in), int(sr_out))
    up, down = sr_out // g, sr_in // g
    h, half = _sinc_filters(up, down)
    n_out = int(round(len(x) * up / down))
    xp = np.pad(x.astype(np.float32), (half, half + 2))
    frames = np.lib.stride_tricks.sliding_window_view(xp, 2 * half + 1)  # the taps around input i
    out = np.empty(n_out, dtype=np.float32)
    step = up * max(1, 65536 // up)  # chunks of whole phase periods bound the memory
    for s in range(0, n_out, step):
        for p in range(min(up, n_out - s)):  # output n is at input n * down / up, phase n % up
            n = np.arange(s + p, min(s + step, n_out), up, dtype=np.int64)
            out[n] = frames[(n * down) // up] @ h[(p * down) % up]
    return out

def load_audio(path, max_seconds=600.0):
    """Any soundfile-readable file as 16 kHz mono float32; a ValueError naming the file if not."""
    path = str(path)
    if not os.path.exists(path):
        raise ValueError(f"{path}: file not found")
    try:
        info = sf.info(path)
        if info.duration > max_seconds:
            raise ValueError(f"{path}: audio is {info.duration:.1f} s long, "
                             f"more than max_seconds={max_seconds}")
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
    if len(x) < MIN_SECONDS * sr:
        raise ValueError(f"{path}: audio is {1000 * len(x) / sr:.1f} ms long, shorter than one "
                         f"{1000 * MIN_SECONDS:.0f}-ms analysis window")
    return resample(x, sr, SAMPLE_RATE)

# -----------------------------------------------------------------------------
# Whisper's log-mel front end

MEL_LOG_STEP = np.log(6.4) / 27.0  # Slaney's mel scale: linear below 1 kHz, log above

def _hz_to_mel(f):
    f = np.asarray(f, dtype=np.float64)
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / MEL_LOG_STEP
    return np.where(f >= 1000.0, log_part, f / (200.0 / 3))

def _mel_to_hz(m):
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp(MEL_LOG_STEP * (m - 15.0)), m * (200.0 / 3))

@lru_cache(maxsize=None)
def mel_filters(n_mels=80, sr=SAMPLE_RATE, n_fft=N_FFT):
    """librosa.filters.mel(sr, n_fft, n_mels): Slaney's scale, area-normalised, (n_mels, 201)."""
    fft_freqs = np.linspace(0, sr / 2, 1 + n_fft // 2)
    mel_f = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    fdiff = np.diff(mel_f)
    ramps = mel_f[:, None] - fft_freqs[None, :]
    lower = -ramps[:-2] / fdiff[:-1, None]
    upper = ramps[2:] / fdiff[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)).astype(np.float32)
    weights *= (2.0 / (mel_f[2:] - mel_f[:-2]))[:, None]  # each triangle has unit area
    return torch.from_numpy(weights)

def log_mel_spectrogram(audio, n_mels=80, padding=0):
    """openai-whisper's log_mel_spectrogram: (n_mels, len(audio + padding) // 160)."""
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

def whisper_mel(audio, n_mels=80, n_frames=N_FRAMES):
    """The features of Whisper's transcribe() (openai-whisper's and faster-whisper's): the log-mel
    of the whole clip, its len(audio) // 160 frames, then cut or zero-padded to n_frames (None:
    all of them; transcribe() slices its 30-s windows from these). The LOG-MEL is padded with 0.0,
    not the audio with zeros (that gives mel.max() - 2, not what Whisper's encoder sees)."""
    n = len(audio) // HOP_LENGTH  # the frames transcribe() calls content; the last ones see a few
    mel = log_mel_spectrogram(audio, n_mels, padding=2 * N_FFT)[:, :n]  # zero samples past the end
    if n_frames is None:
        return mel
    return F.pad(mel[:, :n_frames], (0, max(0, n_frames - n)))

def utterance_mel(audio, n_mels=80, n_frames=None):
    """(mel, pad_value, n): one utterance's mel, the value to pad it with, its real frames.
    n_frames None (our models): the log-mel of the audio, padded with mel.max() - 2 (the value of
    zero audio: the clamp at max - 8). n_frames given (3000 for Whisper weights): Whisper's
    transcribe() features, whisper_mel's first n <= n_frames frames, padded with 0.0."""
    if n_frames is None:
        mel = log_mel_spectrogram(audio, n_mels)
        return mel, mel.max().item() - 2.0, len(audio) // HOP_LENGTH
    mel = whisper_mel(audio, n_mels, None)[:, :n_frames]
    return mel, 0.0, mel.shape[1]

def token_noise(tokens, targets, frac, generator=None):
    """Swap frac of the transcript tokens the decoder reads (never the prompt) for other transcript
    tokens of the batch: it learns to go on from a wrong prefix, which greedy decoding meets."""
    text_in = (targets != -100) & F.pad(targets[:, :-1] != -100, (1, 0))  # input j is text
    swap = text_in & (torch.rand(tokens.shape, generator=generator) < frac).to(tokens.device)
    pool = tokens[text_in]
    draw = torch.randint(len(pool), (int(swap.sum()),), generator=generator).to(tokens.device)
    return tokens.masked_scatter(swap, pool[draw])

# -----------------------------------------------------------------------------
# manifests: a JSON object a line,
# {"audio": path relative to the manifest, "text": ..., "duration": s, "lang": "en"}

def read_manifest(path):
    """The rows of a manifest, audio paths made absolute; a ValueError naming file:line if bad."""
    path = str(path)
    root = os.path.dirname(os.path.abspath(path))
    rows = []
    if not os.path.isfile(path):
        raise ValueError(f"{path}: manifest not found")
    with open(path, 'rb') as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode('utf-8')
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {e.start}: {e.reason})") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
            if 'audio' not in row:
                raise ValueError(f"{where}: missing \"audio\" field")
            for key, types in (('audio', str), ('text', str), ('lang', str),
                               ('duration', (int, float))):
                if key in row and (not isinstance(row[key], types) or isinstance(row[key], bool)):
                    raise ValueError(f"{where}: field \"{key}\" has type {type(row[key]).__name__}")
            row['audio'] = os.path.normpath(os.path.join(root, row['audio']))  # absolute stays
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: empty manifest (no rows)")
    return rows

def check_audio(rows):
    """Every row's audio header read before any work starts (a missing, unreadable or too short
    clip is a one-line ValueError naming it, not a failure mid-run); fills in "duration"."""
    for row in rows:
        if not os.path.exists(row['audio']):
            raise ValueError(f"{row['audio']}: file not found")
        try:
            info = sf.info(row['audio'])
        except Exception as e:
            reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
            raise ValueError(f"{row['audio']}: cannot read audio ({reason})") from None
        if info.frames < MIN_SECONDS * info.samplerate:
            raise ValueError(f"{row['audio']}: audio is {1000 * info.duration:.1f} ms long, "
                             f"shorter than one {1000 * MIN_SECONDS:.0f}-ms analysis window")
        if row.get('duration') is None:
            row['duration'] = info.duration
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

def _row(audio, text, lang):
    return dict(audio=audio, text=text, duration=round(sf.info(audio).duration, 3), lang=lang)

def librispeech_manifest(root, out):
    """LibriSpeech split dir (e.g. LibriSpeech/test-clean) -> a manifest, texts as given."""
    rows = []
    for trans in sorted(glob.glob(os.path.join(root, '*', '*', '*.trans.txt'))):
        with open(trans, encoding='utf-8') as f:
            lines = [line.strip().split(' ', 1) for line in f if line.strip()]
        folder = os.path.dirname(trans)
        rows += [_row(os.path.join(folder, uid + '.flac'), text, 'en') for uid, text in lines]
    if not rows:
        raise ValueError(f"{root}: no LibriSpeech transcripts (SPEAKER/CHAPTER/*.trans.txt)")
    write_manifest(out, rows)
    return rows

def aishell_manifest(root, out_dir):
    """AISHELL-1 (root/wav/{train,dev,test}/SPKR/UTT.wav, root/transcript/
    aishell_transcript_v0.8.txt) -> out_dir/{train,dev,test}.jsonl, text without spaces; wavs
    without a transcript are skipped (as upstream)."""
    trans = os.path.join(root, 'transcript', 'aishell_transcript_v0.8.txt')
    with open(trans, encoding='utf-8') as f:
        trans = {p[0]: ''.join(p[1:]) for p in map(str.split, f) if len(p) > 1}
    out = {}
    for split in ('train', 'dev', 'test'):
        wavs = sorted(glob.glob(os.path.join(root, 'wav', split, '*', '*.wav')))
        uids = [os.path.splitext(os.path.basename(wav))[0] for wav in wavs]
        out[split] = [_row(wav, trans[uid], 'zh') for wav, uid in zip(wavs, uids) if uid in trans]
        write_manifest(os.path.join(out_dir, f'{split}.jsonl'), out[split])
    return out

# -----------------------------------------------------------------------------
# batches

class Batches:
    """Length-bucketed batches, deterministic per (seed, epoch), sharded over DDP ranks (as many
    batches each, no utterance twice); set_epoch(e) first, as with DistributedSampler."""

    def __init__(self, rows, tokenizer, batch_size, seed=1337, rank=0, world_size=1, n_mels=80,
                 n_frames=None, language=None, shuffle=True, cache=True, bucket=50):
        self.rows, self.tokenizer = list(rows), tokenizer
        self.batch_size, self.seed = batch_size, seed
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
        return [idx[i:i + self.batch_size] for i in range(0, len(idx), self.batch_size)]

    def plan(self, epoch=None):
        """The row indices of this rank's batches for an epoch."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.rows)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            perm = rng.permutation(n).tolist()
            chunk = self.batch_size * self.bucket
            by_duration = lambda i: self.rows[i]['duration']
            batches = []
            for s in range(0, n, chunk):  # sorted by duration within chunks: similar, yet random
                batches += self._split(sorted(perm[s:s + chunk], key=by_duration))
            batches = [batches[i] for i in rng.permutation(len(batches))]
        else:
            batches = self._split(list(range(n)))
        W = self.world_size
        while len(batches) % W and any(len(b) > 1 for b in batches):  # split the biggest, drop none
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

    def tokens(self, row, mel_frames):
        prompt = self.tokenizer.sot_sequence(self.language or row.get('lang'))
        if hasattr(self.tokenizer, 'prompt'):  # the audio-LLM's: an <|audio|> per audio token
            prompt = self.tokenizer.prompt(mel_frames)
        if row.get('text') is None:
            return prompt, [-100] * len(prompt)
        seq = prompt + self.tokenizer.encode_text(row['text']) + [self.tokenizer.eot]
        targets = seq[1:]
        # the last prompt position predicts the first text token
        targets[:len(prompt) - 1] = [-100] * (len(prompt) - 1)
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
                     text=[r.get('text') for r in rows], audio=[r['audio'] for r in rows],
                     index=list(idx), duration=torch.tensor([float(r['duration']) for r in rows]))
        if self.tokenizer is not None:
            toks = [self.tokens(r, n) for r, (_, _, n) in zip(rows, mels)]  # (inputs, targets)
            pad = lambda seqs, value: pad_sequence([torch.tensor(s) for s in seqs], True, value)
            batch['tokens'] = pad([t for t, _ in toks], self.tokenizer.eot)
            batch['targets'] = pad([y for _, y in toks], -100)
        return batch

# -----------------------------------------------------------------------------

if __name__ == '__main__':
    _usage = "usage:\n" + "\n".join(__doc__.strip().splitlines()[-2:])
    command = sys.argv.pop(1) if len(sys.argv) > 1 else None
    root, out = '', ''  # ROOT OUT as two words, or --root= --out=
    if len(sys.argv) == 3 and not sys.argv[1].startswith('--'):
        root, out = sys.argv.pop(1), sys.argv.pop(1)
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    try:
        if command == 'librispeech' and root and out:
            print(f"{len(librispeech_manifest(root, out))} utterances -> {out}")
        elif command == 'aishell' and root and out:
            for split, rows in aishell_manifest(root, out).items():
                print(f"{split}: {len(rows)} utterances")
        else:
            sys.exit(_usage)
    except (OSError, ValueError) as e:
        sys.exit(f"data.py: error: {e}")
