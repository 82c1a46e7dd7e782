"""
A synthetic speech corpus: sentences (a command grammar, English `fortunes`, Mandarin poems)
spoken by espeak-ng's voices, resampled to 16 kHz, as {train,val,test}.jsonl manifests:

    python synth.py --out=data/synth_grammar --text=grammar --n_train=3000
    python synth.py --out=data/synth_fortunes --text=fortunes --n_val=50 --holdout_voices=2
"""
import io
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

def synth_one(job):
    """Speak one sentence with espeak-ng, resample to 16 kHz, add noise if asked, write the wav."""
    path, text, voice, speed, pitch, snr_db, seed = job
    wav = subprocess.run(['espeak-ng', '-v', voice, '-s', str(speed), '-p', str(pitch), '--stdout'],
                         input=text.encode('utf-8'), capture_output=True, check=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype='float32')
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

def synth_corpus(out, text='grammar', n_train=3000, n_val=200, n_test=200, holdout_voices=0,
                 noise=0.0, snr_min=5.0, snr_max=30.0, seed=1337, workers=2):
    """Write out/{train,val,test}.jsonl + wavs. The splits have disjoint sentences; holdout_voices=k
    voice families (Mandarin: variants) are heard only in test. Same seed: same corpus."""
    t0 = time.time()
    rng = np.random.default_rng(seed)
    lang = 'zh' if text == 'zh' else 'en'
    counts = dict(train=n_train, val=n_val, test=n_test)
    total = sum(counts.values())
    if text == 'grammar':
        pool = {}  # distinct sentences, in order
        for _ in range(50 * total):
            if len(pool) == total:
                break
            pool[grammar_sentence(rng)] = None
        pool = list(pool)
    elif text in ('fortunes', 'zh'):
        pool = fortunes_sentences() if text == 'fortunes' else zh_sentences()
        pool = [pool[i] for i in rng.permutation(len(pool))]
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
    voices = espeak_voices(lang)
    families = sorted({f for f, _ in voices})
    groups = families if len(families) > holdout_voices else sorted({v for _, v in voices})
    held = set(rng.choice(groups, holdout_voices, replace=False).tolist() if holdout_voices else [])
    is_held = lambda fv: fv[0] in held or fv[1] in held
    train_voices = [fv for fv in voices if not is_held(fv)]
    test_voices = [fv for fv in voices if is_held(fv)] or train_voices
    jobs, rows = [], {s: [] for s in counts}
    for split in ('train', 'val', 'test'):
        pool_v = test_voices if split == 'test' else train_voices
        for i, sentence in enumerate(texts[split]):
            fam, var = pool_v[rng.integers(len(pool_v))]
            voice = f'{fam}+{var}'
            speed, pitch = int(rng.integers(130, 191)), int(rng.integers(30, 71))
            snr = float(rng.uniform(snr_min, snr_max)) if rng.random() < noise else None
            path = os.path.join(os.path.abspath(out), 'wav', split, f'{split}_{i:05d}.wav')
            jobs.append((path, sentence, voice, speed, pitch, snr, seed * 1000003 + len(jobs)))
            rows[split].append(dict(audio=path, text=sentence, duration=None, lang=lang,
                                    voice=voice, speed=speed, pitch=pitch))
    if workers > 1:
        with multiprocessing.get_context('fork').Pool(workers) as procs:
            durations = procs.map(synth_one, jobs, chunksize=16)
    else:
        durations = [synth_one(j) for j in jobs]
    it = iter(durations)
    for split in ('train', 'val', 'test'):
        for row in rows[split]:
            row['duration'] = round(next(it), 3)
        write_manifest(os.path.join(out, f'{split}.jsonl'), rows[split])
    hours, dt = sum(durations) / 3600, time.time() - t0
    print(f"synth {text}: train {n_train} val {n_val} test {n_test} utterances, {hours:.2f} h of "
          f"audio, held-out voices {sorted(held) or '-'}, {dt:.1f} s "
          f"({hours * 3600 / max(dt, 1e-9):.0f}x real time) -> {out}")
    return rows


if __name__ == '__main__':
    out, text, seed, workers = '', 'grammar', 1337, 2  # synth_corpus's arguments
    n_train, n_val, n_test, holdout_voices = 3000, 200, 200, 0
    noise, snr_min, snr_max = 0.0, 5.0, 30.0  # noise: the fraction of utterances with noise
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
    if not out:
        sys.exit("usage: python synth.py --out=DIR [--text=grammar|fortunes|zh] [--n_train=N] ...")
    synth_corpus(out, text, n_train, n_val, n_test, holdout_voices, noise, snr_min, snr_max, seed, workers)
