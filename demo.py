"""
The paper's Table 1 in miniature, on real Whisper weights (CPU is enough):

    python demo.py                      # the full demo: Whisper base teacher, Piper-voice corpus
    python demo.py --split=dev          # the same rows scored on dev, 150 sentences of their own
                                        # (choose settings here)
    python demo.py --small=True         # a smoke run: tiny corpus, a few steps per row (plumbing)
    python demo.py --rows=base,opd      # some rows only; later rows reuse earlier rows' checkpoints
    python demo.py --seed=1             # another training seed (same corpus) -> out/demo_seed1/
    python demo.py --rows=ark_base,ark_opd,teacher  # the audio-LLM student (not in the default)
    python demo.py --rows=ark_td,ark_td_opd         # its TD rows, from that run's ark_base

Speech: fortunes sentences in the Piper voice (synth.py); the second column is the same test (or
dev) sentences in espeak-ng voices never heard in training. Rows: base = a 2-layer-decoder student
on base's frozen encoder (teacher decoder layers 0 and 5), SFT on the n_labeled clips that keep
their labels (train.py). From base, on other audio without its labels, the same number
of updates each: opd (distill.py: topk_union, greedy, with the anti-loop measures), opd_pure
(the paper's loss alone), opd_rkl (reverse KL, sampled rollouts; not in the default), td
(train.py on the teacher's transcripts), td_opd (td, then opd), dw (distil-whisper's objective
on the teacher's transcripts: what users run today; not OPD). References: teacher (Whisper
base) and tiny_en (Whisper tiny.en). The paper's own student shape, an audio-LLM (base's frozen
encoder -> adapter -> a causal LM of 4 blocks from base's decoder layers 0 and 5): ark_base
(train.py --student=audio_llm, supervised), ark_opd (distill.py through text: the student's
rollouts re-tokenized and scored by the teacher), ark_td (ark_base on the teacher's transcripts
of its 2,000 clips) and ark_td_opd (ark_td, then ark_opd); their gap is ark_base -> teacher.
Test WER is scored greedy and with Whisper's temperature fallback (loops: the transcripts it
redoes); gap closed comes with a paired bootstrap interval.
Each student row runs its recipe in config/ (RECIPES: train.py or distill.py on that file), which
holds all of its training settings; demo.py adds only this run's paths and the seed (recipe_run),
and for the smoke run a few steps on small batches.
Everything goes to out/demo/: results.json, demo.png, one directory per row (ckpt.pt for
evaluate.py --ckpt, log.jsonl; whisper.pt for openai-whisper from opd and td_opd).
"""
import glob
import itertools
import json
import os
import random
import subprocess
import sys
import time
import zlib

import torch

import checkpoint
import common
import data
import evaluate
import synth

# -----------------------------------------------------------------------------
small = False  # the smoke run
rows = 'base,opd,opd_pure,td,td_opd,dw,teacher,tiny_en'  # opd_rkl (not in the paper's): --rows=
seed = 1337  # the training seed; the corpus is the same for every seed
split = 'test'  # 'dev': score on the dev split (val, val_espeak) to choose settings; no test
if __name__ == '__main__':
    exec(open(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'configurator.py')).read())
# -----------------------------------------------------------------------------
STUDENT_ROWS = ['base', 'opd', 'opd_pure', 'opd_rkl', 'td', 'td_opd', 'dw', 'ark_base', 'ark_opd',
                'ark_td', 'ark_td_opd']
INIT = {'opd': 'base', 'opd_pure': 'base', 'opd_rkl': 'base', 'td': 'base', 'td_opd': 'td',
        'dw': 'base', 'ark_opd': 'ark_base', 'ark_td': 'ark_base', 'ark_td_opd': 'ark_td'}
BASE_OF = dict(INIT, td_opd='base', ark_td_opd='ark_base')  # the gap a row closes: BASE_OF[row]
ARK_ROWS = {'ark_base', 'ark_opd', 'ark_td', 'ark_td_opd'}  # the audio-LLM: its own clips
REF_ROWS = ['teacher', 'tiny_en']
CACHE_DIR = 'out/demo/encoder_cache'  # base's encoder outputs, shared by every row, seed and run
CORPUS_SEED = 1337
# The corpus: fortunes sentences in the Piper voice (train, test), and test's sentences again in
# espeak-ng voices never heard in training (test_espeak: 2 voice families), the out-of-domain
# column. n_labeled training clips keep their labels (base's SFT data); the n_unlabeled others
# are the audio of the later rows. The audio-LLM rows have their own ark_n_train clips, the first
# ark_n_labeled with their labels. Dev is a corpus of its own: n_dev sentences after the first
# dev_skip of the same order (the two corpora above use 2,190), so none is in test or train, in
# the Piper voice (val) and in 2 more espeak-ng families (val_espeak). (The corpus's own val of
# n_val sentences is unused: it stays so that test's sentences stay the same.)
FULL = dict(corpus='data/synth_piper', n_labeled=80, n_unlabeled=320, n_val=40, n_test=150,
            ood_voices=2, speed_utts=16, ark_corpus='data/synth_piper_ark', ark_n_train=2000,
            ark_n_labeled=1600, dev_corpus='data/synth_piper_demo_dev', n_dev=150,
            dev_skip=2190)
# The smoke run: a tiny corpus, and every row's recipe cut to a few steps on small batches
# (smoke); base and ark_base, which keep their best val WER's weights, a few more, with evals
SMALL = dict(FULL, corpus='data/synth_piper_small', ark_corpus='data/synth_piper_ark_small',
             ark_n_train=16, ark_n_labeled=12, n_labeled=3, n_unlabeled=12, n_val=4,
             n_test=6, ood_voices=1, speed_utts=4, dev_corpus='data/synth_piper_demo_dev_small',
             n_dev=4,
             smoke=dict(max_iters=3, batch_size=4, val_max_utts=4),
             smoke_sft=dict(max_iters=12, eval_interval=6))
# Each student row runs its recipe in config/, which holds all of the row's training settings;
# demo.py overrides only this run's paths (recipe_run) and the seed, and in the smoke run the sizes
RECIPES = {'base': ('train.py', 'config/train_demo_base.py'),
           'opd': ('distill.py', 'config/distill_demo_opd.py'),
           'opd_pure': ('distill.py', 'config/distill_demo_opd_pure.py'),
           'opd_rkl': ('distill.py', 'config/distill_demo_opd_rkl.py'),
           'td': ('train.py', 'config/train_demo_td.py'),
           'dw': ('train.py', 'config/train_demo_dw.py'),
           'td_opd': ('distill.py', 'config/distill_demo_opd.py'),  # opd's, from td's weights
           'ark_base': ('train.py', 'config/train_ark_base.py'),
           'ark_opd': ('distill.py', 'config/distill_ark_opd.py'),
           'ark_td': ('train.py', 'config/train_ark_td.py'),
           'ark_td_opd': ('distill.py', 'config/distill_ark_opd.py')}  # from ark_td's weights
TRAIN_DATA = {'base': 'labeled', 'opd': 'unlabeled', 'opd_pure': 'unlabeled',
              'opd_rkl': 'unlabeled', 'td_opd': 'unlabeled', 'ark_base': 'ark_train',
              'ark_opd': 'ark_unlabeled', 'ark_td_opd': 'ark_unlabeled'}
cfg = SMALL if small else FULL
base_out = 'out/demo' + ('_small' if small else '')
out = base_out + (f'_seed{seed}' if seed != 1337 else '')
# td's, dw's and ark_td's data: the teacher's transcripts of their family's unlabeled clips
LABELS = {'td': 'unlabeled', 'dw': 'unlabeled', 'ark_td': 'ark_unlabeled'}
TEACHER_LABELS = {'unlabeled': os.path.join(out, 'teacher_labels.jsonl'),
                  'ark_unlabeled': os.path.join(out, 'ark_teacher_labels.jsonl')}
want = [r for r in rows.split(',') if r]
if split not in ('dev', 'test'):
    sys.exit(f"demo.py: error: split={split!r}: expected dev or test")
SETS = ('val', 'val_espeak') if split == 'dev' else ('test', 'test_espeak')  # the two columns
if set(want) - set(STUDENT_ROWS + REF_ROWS):
    sys.exit(f"demo.py: error: unknown rows {sorted(set(want) - set(STUDENT_ROWS + REF_ROWS))}")

def prepare_data():
    """Weights, corpus, and the labeled / unlabeled split of train (unlabeled rows have no text)."""
    if not os.path.isdir(synth.FORTUNES):
        sys.exit(f"demo.py: error: {synth.FORTUNES} not found: run `bash setup.sh` first")
    checkpoint.assemble_weights('weights')
    if not os.path.exists(os.path.join(cfg['corpus'], 'test_espeak.jsonl')):
        synth.synth_corpus(cfg['corpus'], text='fortunes', voices='piper',
                           n_train=cfg['n_labeled'] + cfg['n_unlabeled'], n_val=cfg['n_val'],
                           n_test=cfg['n_test'], ood_voices=cfg['ood_voices'], seed=CORPUS_SEED)
    if not os.path.exists(os.path.join(cfg['dev_corpus'], 'val_espeak.jsonl')):
        synth.synth_corpus(cfg['dev_corpus'], text='fortunes', voices='piper', n_train=0,
                           n_val=cfg['n_dev'], n_test=0, ood_voices=cfg['ood_voices'],
                           skip=cfg['dev_skip'], seed=CORPUS_SEED)
    train = data.read_manifest(os.path.join(cfg['corpus'], 'train.jsonl'))
    n_lab = cfg['n_labeled']
    unlabeled = [{k: v for k, v in r.items() if k != 'text'} for r in train[n_lab:]]
    paths = {'labeled': os.path.join(out, 'labeled.jsonl'),
             'unlabeled': os.path.join(out, 'unlabeled.jsonl')}
    for name in ('val', 'val_espeak', 'test', 'test_espeak'):
        corpus = cfg['dev_corpus' if name.startswith('val') else 'corpus']
        paths[name] = os.path.join(corpus, f'{name}.jsonl')
    data.write_manifest(paths['labeled'], train[:n_lab])
    data.write_manifest(paths['unlabeled'], unlabeled)
    print(f"demo data: {n_lab} labeled + {len(unlabeled)} unlabeled train utterances -> {out}")
    if ARK_ROWS & set(want):  # the audio-LLM's own clips: Ark-Base's labeled ones, then new ones
        ark = cfg['ark_corpus']
        train = os.path.join(ark, 'train.jsonl')
        if not os.path.exists(train) or sum(1 for _ in open(train)) != cfg['ark_n_train']:
            # the same seed and split sizes: the same val/test sentences as the demo's (unused
            # here), and none of them in its train split
            synth.synth_corpus(ark, text='fortunes', voices='piper', n_train=cfg['ark_n_train'],
                               n_val=cfg['n_val'], n_test=cfg['n_test'], seed=CORPUS_SEED)
        rows = data.read_manifest(train)
        paths['ark_train'] = os.path.join(out, 'ark_labeled.jsonl')
        paths['ark_unlabeled'] = os.path.join(out, 'ark_unlabeled.jsonl')  # the same audio + new
        data.write_manifest(paths['ark_train'], rows[:cfg['ark_n_labeled']])
        data.write_manifest(paths['ark_unlabeled'], [{k: v for k, v in r.items() if k != 'text'}
                                                     for r in rows])
    return paths

def encode_all(paths):
    """Stage 'encode': base's frozen encoder once per clip (bf16 autocast where the CPU has bf16
    kernels), kept on disk (float16)."""
    model = checkpoint.load_checkpoint('weights/base')[0]
    cache = common.EncoderCache(model.encoder, CACHE_DIR,
                                common.autocast('cpu', cpu_bf16=common.cpu_bf16_ok()))
    whisper_rows = set(want) & set(STUDENT_ROWS) - ARK_ROWS  # they train on labeled, unlabeled
    names = ['val', *SETS] + ['labeled', 'unlabeled'] * bool(whisper_rows)
    for name in names + ['ark_unlabeled'] * ('ark_unlabeled' in paths):  # ark_train's within
        for batch in data.Batches(data.read_manifest(paths[name]), None, batch_size=8,
                                  n_frames=data.N_FRAMES, shuffle=False):
            cache(batch['mel'], batch['audio'])
    return cache

def recipe_run(row, paths):
    """What train_row runs for a student row, without running it: (script, recipe, overrides).
    The overrides are this run's paths and seed; the smoke run's sizes too."""
    script, recipe = RECIPES[row]
    rdir = os.path.join(out, row)
    train = TEACHER_LABELS[LABELS[row]] if row in LABELS else paths[TRAIN_DATA[row]]
    kw = dict(out_dir=rdir, train_manifest=train, val_manifest=paths['val'],
              encoder_cache_dir=CACHE_DIR, seed=seed)
    if row in INIT:
        kw['init_from'] = os.path.join(out, INIT[row], 'ckpt.pt')
    if small:
        kw.update(cfg['smoke'], **(cfg['smoke_sft'] if row in ('base', 'ark_base') else {}))
    return script, recipe, kw

def run(script, recipe, overrides):
    cmd = [sys.executable, script, recipe] + [f'--{k}={v}' for k, v in overrides.items()]
    print(f"=== {' '.join(cmd)}", flush=True)
    if subprocess.run(cmd).returncode:
        sys.exit(f"demo.py: error: {script} {recipe} failed")
    return cmd

def teacher_labels(paths, cache, name):
    """The teacher's greedy transcripts of the clips of paths[name]; those that do not end are
    dropped."""
    model, tok, _ = checkpoint.load_checkpoint('weights/base')
    rows, path = data.read_manifest(paths[name]), TEACHER_LABELS[name]
    tokens, ended = evaluate.decode(model, tok, rows, batch_size=16, encode=cache,
                                    max_new_tokens=64, check_speech=True)
    kept = [dict(r, text=tok.decode(t).strip()) for r, t, e in zip(rows, tokens, ended) if e and t]
    data.write_manifest(path, [r for r in kept if r['text']])
    print(f"teacher transcripts: kept {len(kept)} of {len(rows)} -> {path}")

def train_row(row, paths, cache):
    """Run one student row (train.py or distill.py) unless its checkpoint exists; its wall
    seconds."""
    rdir = os.path.join(out, row)
    if (os.path.exists(os.path.join(rdir, 'ckpt.pt'))
            and os.path.exists(os.path.join(rdir, 'summary.json'))):
        print(f"{row}: reusing {rdir}/ckpt.pt")
        return json.load(open(os.path.join(rdir, 'summary.json')))
    init = os.path.join(out, INIT.get(row, ''), 'ckpt.pt')
    if row in INIT and not os.path.exists(init):
        sys.exit(f"demo.py: error: {row} needs {init}: run --rows={INIT[row]} first")
    if os.path.exists(os.path.join(rdir, 'log.jsonl')):
        os.remove(os.path.join(rdir, 'log.jsonl'))
    t0 = time.time()
    if row in LABELS and not os.path.exists(TEACHER_LABELS[LABELS[row]]):
        teacher_labels(paths, cache, LABELS[row])
    cmd = run(*recipe_run(row, paths))
    summary = {'wall_s': time.time() - t0, 'ckpt': os.path.join(rdir, 'ckpt.pt'),
               'vuss_log': vuss_of(rdir), 'cmd': ' '.join(cmd[1:])}
    with open(os.path.join(rdir, 'log.jsonl')) as f:
        log = [json.loads(line) for line in f]
    # the last value of every logged field
    summary.update({k: v for r in log for k, v in r.items()})
    if row in ('opd', 'td_opd'):  # the distilled students in openai-whisper's format too
        model, tok, _ = checkpoint.load_checkpoint(summary['ckpt'])
        summary['whisper_pt'] = os.path.join(rdir, 'whisper.pt')
        checkpoint.save_pt(model, summary['whisper_pt'], tok)
    with open(os.path.join(rdir, 'summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)
    return summary

def vuss_of(rdir):
    with open(os.path.join(rdir, 'log.jsonl')) as f:
        vals = [r['vuss'] for r in map(json.loads, f) if 'vuss' in r]
    return {'mean': sum(vals) / len(vals), 'min': min(vals), 'max': max(vals)} if vals else None

def compression_ratio(text):
    """Whisper's loop detector: how much better than 1x gzip compresses the transcript."""
    b = text.encode('utf-8')
    return len(b) / len(zlib.compress(b)) if b else 0.0

def fallback(model, tok, rows, cache, hyps, threshold=2.4, temperatures=(0.2, 0.4, 0.6, 0.8, 1.0)):
    """Whisper's temperature fallback (its compression-ratio half): a transcript that compresses
    better than 2.4x is decoded again, sampling at rising temperatures, until one does not."""
    out, redone = list(hyps), 0
    for i, h in enumerate(hyps):
        if compression_ratio(h) <= threshold:
            continue
        redone += 1
        g = torch.Generator().manual_seed(i)
        for T in temperatures:
            tokens, _ = evaluate.decode(model, tok, [rows[i]], encode=cache, temperature=T,
                                        generator=g)
            out[i] = tok.decode(tokens[0]).strip()
            if compression_ratio(out[i]) <= threshold:
                break
    return out, redone

SCORES = ('wer', 's', 'd', 'i', 'n', 'median_utt_wer')  # kept of the fallback scoring

def row_path(row):
    refs = {'teacher': 'weights/base', 'tiny_en': 'weights/tiny.en'}
    return refs.get(row, os.path.join(out, row, 'ckpt.pt'))

def evaluate_row(row, test_rows, cache, name, extra=True):
    """WER greedy on test_rows (the split called name), from cached encoder outputs; the
    base-encoder rows, with extra, also with Whisper's fallback. Also per-utterance (words,
    errors) for the bootstrap."""
    model, tok, _ = checkpoint.load_checkpoint(row_path(row))
    if row == 'tiny_en':  # its own encoder, on the same terms as base's, cached on disk
        cache = common.EncoderCache(model.encoder, CACHE_DIR,
                                    common.autocast('cpu', cpu_bf16=common.cpu_bf16_ok()))
    t0 = time.time()
    tokens, _ = evaluate.decode(model, tok, test_rows, batch_size=16, encode=cache)
    hyps = [tok.decode(t).strip() for t in tokens]
    wall = time.time() - t0
    res = evaluate.report(test_rows, hyps, wall)
    res.update(eval_wall_s=wall, params=model.get_num_params())
    line = (f"{row} on {name}: WER {100 * res['wer']:.2f}% "
            f"(S {res['s']} D {res['d']} I {res['i']} of {res['n']})")
    if row != 'tiny_en' and extra:
        fb, redone = fallback(model, tok, test_rows, cache, hyps)
        f = evaluate.report(test_rows, fb, wall)
        res['fallback'] = dict({k: f[k] for k in SCORES}, redone=redone)
        line += f"; fallback {100 * f['wer']:.2f}% ({redone})"
    print(line, flush=True)
    per_utt = evaluate.score([r['text'] for r in test_rows], hyps, 'word', 'en',
                             per_utt=True)['utts']
    return res, [(n, s + d + i) for n, s, d, i in per_utt]

def gap_interval(utts, row, n_boot=2000):
    """Paired bootstrap over test utterances (one resample for base, row and teacher alike): the
    2.5 / 97.5 percentiles of the share of the base -> teacher WER gap that row closes (base:
    BASE_OF[row])."""
    base = BASE_OF[row]
    rng, n, closed = random.Random(0), len(utts[base]), []
    for _ in range(n_boot):
        idx = [rng.randrange(n) for _ in range(n)]
        w = {r: sum(utts[r][i][1] for i in idx) / max(1, sum(utts[r][i][0] for i in idx))
             for r in (base, 'teacher', row)}
        if w[base] != w['teacher']:
            closed.append((w[base] - w[row]) / (w[base] - w['teacher']))
    closed.sort()
    if not closed:
        return None
    return [closed[int(0.025 * len(closed))], closed[int(0.975 * len(closed)) - 1]]

def measure_speed(student_row, test_rows, cache):
    """Greedy decode speed of student and teacher back to back: RTFx of evaluate.transcribe
    (encoder included) and the decoder alone (cached encoder) in ms per emitted token."""
    speed = {'student_row': student_row, 'utterances': len(test_rows)}
    for name, path in (('teacher', row_path('teacher')), ('student', row_path(student_row))):
        model, tok, _ = checkpoint.load_checkpoint(path)
        evaluate.transcribe(model, tok, test_rows[:2])  # warm-up
        t0 = time.time()
        hyps = evaluate.transcribe(model, tok, test_rows, batch_size=16)
        res = evaluate.report(test_rows, hyps, time.time() - t0)
        speed[f'{name}_rtfx'], speed[f'{name}_wall_s'] = res['rtfx'], time.time() - t0
        t0 = time.time()
        tokens, ended = evaluate.decode(model, tok, test_rows, batch_size=16, encode=cache)
        ms = 1000 * (time.time() - t0)
        speed[f'{name}_decoder_ms_per_token'] = ms / (sum(map(len, tokens)) + sum(ended))
    speed['speedup'] = speed['student_rtfx'] / speed['teacher_rtfx']
    speed['decoder_speedup'] = (speed['teacher_decoder_ms_per_token']
                                / speed['student_decoder_ms_per_token'])
    return speed

def print_table(results, utts):
    print(f"\n{'row':<9} {'WER%':>7} {'S':>5} {'D':>5} {'I':>5} {'N':>5} {'med%':>6} "
          f"{'loops':>5} {'fallb%':>7} {'ood%':>7} {'VUSS':>6} {'mism%':>6} "
          f"{'train_s':>8}")
    for row in REF_ROWS + STUDENT_ROWS:
        r = results.get(row)
        if not r or 'wer' not in r:
            continue
        vuss = f"{r['vuss']['mean']:.2f}" if r.get('vuss') else '-'
        train_s = f"{r['train_wall_s']:.0f}" if r.get('train_wall_s') is not None else '-'
        fb = r.get('fallback')
        fallb = f"{fb['redone']:5d} {100 * fb['wer']:7.2f}" if fb else f"{'-':>5} {'-':>7}"
        ood = f"{100 * r['ood']['wer']:7.2f}" if r.get('ood') else f"{'-':>7}"
        # the text route: the share of rollouts the teacher's tokenizer segments otherwise
        mism = r.get('summary', {}).get('retokenize_mismatch_ratio')
        mism = '-' if mism is None else f"{100 * mism:.1f}"
        print(f"{row:<9} {100 * r['wer']:7.2f} {r['s']:5d} {r['d']:5d} {r['i']:5d} {r['n']:5d} "
              f"{100 * r['median_utt_wer']:6.1f} {fallb} {ood} {vuss:>6} {mism:>6} "
              f"{train_s:>8}")
    t, closes, intervals = results.get('teacher'), {}, {}
    views = (('', '', lambda r: r.get('wer')),
             ('_fallback', " (with Whisper's fallback)",
              lambda r: r.get('fallback', {}).get('wer')))
    for (key, name, get), row in itertools.product(views, BASE_OF):
        b = results.get(BASE_OF[row])
        if b and t and None not in (get(b), get(t)) and get(b) != get(t):
            if get(results.get(row, {})) is not None:
                closes[row + key] = (get(b) - get(results[row])) / (get(b) - get(t))
                ci = ''
                if not key and {row, BASE_OF[row], 'teacher'} <= set(utts):
                    intervals[row] = gap_interval(utts, row)
                    ci = (f" (95% paired bootstrap {100 * intervals[row][0]:.0f}% .. "
                          f"{100 * intervals[row][1]:.0f}%)")
                print(f"{row}: closes {100 * closes[row + key]:.0f}% of the {BASE_OF[row]} -> "
                      f"teacher gap{name}{ci}")
    return closes, intervals

def over_seeds(name):
    """Every seed's run of this demo so far (out/demo, out/demo_seed<N>): test WER and gap closed
    per seed, and their mean; written to out/demo/seeds.json."""
    runs = {}
    for d in [base_out] + sorted(glob.glob(base_out + '_seed*')):
        if os.path.exists(os.path.join(d, name)):
            r = json.load(open(os.path.join(d, name)))
            runs[r['config']['seed']] = r
    if len(runs) < 2:
        return
    print(f"\nover seeds {', '.join(map(str, runs))}: WER % per seed (mean); gap closed [95% CI]")
    table = {}
    for row in REF_ROWS + STUDENT_ROWS:
        rs = [r[row] for r in runs.values() if r.get(row, {}).get('wer') is not None]
        if len(rs) < len(runs):
            continue
        wer = [r['wer'] for r in rs]
        gaps = [(r.get('gap_closed', {}).get(row), r.get('gap_closed_ci95', {}).get(row)
                 or [float('nan')] * 2) for r in runs.values()]
        table[row] = dict(wer=wer, ood=[r['ood']['wer'] for r in rs], gap=gaps)
        line = f"{row:<8} " + ' '.join(f"{100 * w:6.2f}" for w in wer)
        line += f" ({100 * sum(wer) / len(wer):.2f})"
        if all(g is not None for g, _ in gaps):
            line += '; gap ' + ' '.join(f"{100 * g:.0f}% [{100 * c[0]:.0f}, {100 * c[1]:.0f}]"
                                        for g, c in gaps)
            line += f" (mean {100 * sum(g for g, _ in gaps) / len(gaps):.0f}%)"
        print(line)
    with open(os.path.join(base_out, 'seeds.json'), 'w') as f:
        json.dump({'seeds': list(runs), 'rows': table}, f, indent=1)

def plot(results):
    """demo.png: test WER per row; the gap each student row closes, with its 95% interval; per
    step of the OPD rows the KL to the teacher and VUSS."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    names = [r for r in REF_ROWS + STUDENT_ROWS if results.get(r, {}).get('wer') is not None]
    fig, ax = plt.subplots(1, 4, figsize=(17, 3.6))
    ax[0].bar(names, [100 * results[r]['wer'] for r in names],
              color=['C1' if r in REF_ROWS else 'C0' for r in names])
    ax[0].set_ylabel('test WER (%)')
    closed = [r for r in STUDENT_ROWS if r in results.get('gap_closed', {})]
    gap = [100 * results['gap_closed'][r] for r in closed]
    ci = [results.get('gap_closed_ci95', {}).get(r) or [float('nan')] * 2 for r in closed]
    err = [[max(0, g - 100 * c[0]) for g, c in zip(gap, ci)],  # no bar where no interval was kept
           [max(0, 100 * c[1] - g) for g, c in zip(gap, ci)]]
    ax[1].bar(closed, gap, yerr=err, capsize=3)
    ax[1].axhline(0, color='k', lw=0.5)
    ax[1].set(ylabel='gap to the teacher closed (%)', title='95% paired bootstrap interval')
    for a in ax[:2]:
        a.tick_params(axis='x', rotation=30)
    for row in ('opd', 'opd_pure', 'opd_rkl', 'td_opd', 'ark_opd', 'ark_td_opd'):
        path = os.path.join(out, row, 'log.jsonl')
        if os.path.exists(path):
            log = [r for r in map(json.loads, open(path)) if 'kl_st' in r]
            ax[2].plot([r['iter'] for r in log], [r['kl_st'] for r in log], label=row)
            ax[3].plot([r['iter'] for r in log], [r['vuss'] for r in log], label=row)
    ax[2].set(xlabel='step', ylabel='KL(student || teacher) per token', title='on the rollouts')
    ax[3].set(xlabel='step', ylabel='VUSS (k..2k, lower = more overlap)', title='support overlap')
    for a in ax[2:]:
        a.legend()
    fig.suptitle('nanoOPD: Table 1 in miniature')
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'demo.png'), dpi=110)
    plt.close(fig)

if __name__ == '__main__':
    t_all, stages = time.time(), {}
    t0 = time.time()
    paths = prepare_data()
    stages['data'] = time.time() - t0
    t0 = time.time()
    cache = encode_all(paths)
    stages['encode'] = time.time() - t0
    results_path = os.path.join(out, 'results.json' if split == 'test' else 'results_dev.json')
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    for row in STUDENT_ROWS:  # in order: later rows start from earlier rows' checkpoints
        if row in want:
            s = train_row(row, paths, cache)
            stages[f'train_{row}'] = s['wall_s']
            results[row] = {'train_wall_s': s['wall_s'], 'train_iters': s.get('iter'),
                            'vuss': s['vuss_log'], 'summary': s}
    test_rows, ood_rows = (data.read_manifest(paths[name]) for name in SETS)
    utts, utts_ood = {}, {}
    bases = {BASE_OF[r] for r in want if r in BASE_OF} | {'teacher'}  # for the gap closed
    for row in REF_ROWS + STUDENT_ROWS:
        if row in want or (row in bases and os.path.exists(row_path(row))):
            t0 = time.time()
            res, utts[row] = evaluate_row(row, test_rows, cache, SETS[0])
            ood, utts_ood[row] = evaluate_row(row, ood_rows, cache, SETS[1], extra=False)
            stages[f'eval_{row}'] = time.time() - t0
            res.pop('utts')  # per-utterance transcripts stay out of the table file
            res['ood'] = {k: ood[k] for k in SCORES}
            results[row] = dict(results.get(row, {}), **res)
    for family in (('opd', 'td_opd', 'base'), ('ark_opd', 'ark_td_opd', 'ark_base')):  # one each
        student = next((r for r in family if r in want and os.path.exists(row_path(r))), None)
        if student and 'teacher' in want:
            t0 = time.time()
            results.setdefault('speed', {})[student] = measure_speed(
                student, test_rows[:cfg['speed_utts']], cache)
            stages[f'speed_{student}'] = time.time() - t0
    stages['total'] = time.time() - t_all
    results['stages_s'] = dict(results.get('stages_s', {}), **stages)
    results['config'] = dict(cfg, seed=seed, small=small)
    results['split'] = list(SETS)
    # intervals need per-utterance scores, which only this run's rows have in memory: a row not
    # scored now keeps its interval from the run that scored it, while its gap closed is unchanged
    old = {k: results.get(k, {}) for k in ('gap_closed', 'gap_closed_ci95', 'gap_closed_ood',
                                           'gap_closed_ood_ci95')}
    closes, intervals = print_table(results, utts)
    closes_ood, intervals_ood = {}, {}
    t = results.get('teacher', {}).get('ood')
    for row in BASE_OF:  # the out-of-domain column: espeak-ng voices
        b = results.get(BASE_OF[row], {}).get('ood')
        if b and t and b['wer'] != t['wer'] and results.get(row, {}).get('ood'):
            closes_ood[row] = (b['wer'] - results[row]['ood']['wer']) / (b['wer'] - t['wer'])
            if {row, BASE_OF[row]} <= set(utts_ood):
                intervals_ood[row] = ci = gap_interval(utts_ood, row)
                print(f"{row}: closes {100 * closes_ood[row]:.0f}% of the gap on {SETS[1]} "
                      f"(95% paired bootstrap {100 * ci[0]:.0f}% .. {100 * ci[1]:.0f}%)")
    for key, now, ci in (('', closes, intervals), ('_ood', closes_ood, intervals_ood)):
        kept = {r: c for r, c in old[f'gap_closed{key}_ci95'].items()
                if r not in ci and now.get(r) == old[f'gap_closed{key}'].get(r)}
        results[f'gap_closed{key}'], results[f'gap_closed{key}_ci95'] = now, {**kept, **ci}
    for sp in results.get('speed', {}).values():
        print(f"greedy decode speed ({sp['utterances']} utts, encoder included): "
              f"{sp['student_row']} RTFx {sp['student_rtfx']:.1f} vs teacher "
              f"{sp['teacher_rtfx']:.1f} ({sp['speedup']:.2f}x); decoder alone "
              f"{sp['decoder_speedup']:.2f}x")
    print('stage seconds: ' + ', '.join(f"{k} {v:.0f}" for k, v in stages.items()))
    with open(results_path + '.tmp', 'w') as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(results_path + '.tmp', results_path)
    print(f"wrote {results_path}")
    plot(results)
    over_seeds(os.path.basename(results_path))
