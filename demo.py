"""
The paper's Table 1 in miniature, on real Whisper weights (CPU is enough):

    python demo.py                      # the full demo (natural-text espeak corpus, Whisper base teacher)
    python demo.py --small              # a ~2-minute smoke run (tiny corpus, a few steps per row)
    python demo.py --rows=base,opd      # some rows only; later rows reuse earlier rows' checkpoints under out/demo/
    python demo.py --seed=1             # another training seed (same corpus) -> out/demo_seed1/

Rows: base = a 2-layer-decoder student on Whisper base's frozen encoder (decoder layers 0 and 5 of the teacher), SFT on
3% of the training labels (90 clips); from base, on other training audio without its labels and with the same number of
student updates: opd (topk_union, greedy rollouts: the paper), opd_rkl (reverse KL, sampled rollouts), td (SFT on the
teacher's transcripts), td_opd (td's checkpoint, then opd); the OPD rows with loop_unlikelihood. Reference rows: teacher
(Whisper base, greedy) and tiny_en (Whisper tiny.en, greedy). Stages: data (weights, espeak corpus), encode (base's
encoder once per clip, cached on disk), one per row, eval (test WER: greedy, cut at the length bound, and with Whisper's
temperature fallback), speed. Everything goes to out/demo/: results.json, demo.png (matplotlib), one directory per row
(ckpt.pt for evaluate.py --ckpt, log.jsonl, summary.json; whisper.pt for openai-whisper from opd and td_opd).
"""
import json
import os
import statistics
import sys
import time
import zlib

import torch

import data
import distill
import evaluate
import teacher

OUT = 'out/demo'  # --seed=N (N != 1337) writes out/demo_seedN; --small writes out/demo_small
CACHE_DIR = 'out/demo/encoder_cache'  # base's encoder outputs, shared by every row, seed and run
STUDENT_ROWS = ['base', 'opd', 'opd_rkl', 'td', 'td_opd']
REF_ROWS = ['teacher', 'tiny_en']
# label_frac of the n_train training utterances keep their labels (base's SFT data); n_unlabeled of the others are the
# unlabeled audio of the later rows (what iters x batch_size steps read: every clip costs one encoder pass, and OPD gains
# more from new clips than from a second pass over old ones: measured, 1,200 clips once beat 400 clips three times).
# token_noise: the supervised rows' (base, td) decoder inputs get that fraction of their transcript tokens swapped (see
# distill.ce_step); without it the 2-layer base loops on held-out voices (7-12 of 200 test utterances, measured).
FULL = dict(corpus='data/synth_fortunes', n_train=3000, n_val=50, n_test=200, label_frac=0.03, n_unlabeled=1000,
            sft_iters=450, sft_lr=2e-4, sft_eval=50, sft_batch_size=8, token_noise=0.3, iters=110, lr=1e-4, batch_size=16,
            warmup=5, val_max_utts=50, speed_utts=16)
SMALL = dict(corpus='data/synth_fortunes_small', n_train=30, n_val=4, n_test=10, label_frac=0.10, n_unlabeled=27,
             sft_iters=12, sft_lr=2e-4, sft_eval=6, sft_batch_size=4, token_noise=0.3, iters=3, lr=1e-4, batch_size=4,
             warmup=1, val_max_utts=4, speed_utts=4)
CORPUS_SEED = 1337  # the corpus (texts, voices) is the same for every --seed; seeds change the training

def parse_args(argv):
    args = {'small': False, 'rows': STUDENT_ROWS + REF_ROWS, 'seed': 1337}
    for a in argv:
        if a == '--small':
            args['small'] = True
        elif a.startswith('--rows='):
            args['rows'] = [r for r in a.split('=', 1)[1].split(',') if r]
        elif a.startswith('--seed='):
            args['seed'] = int(a.split('=', 1)[1])
        else:
            raise SystemExit(f"usage: python demo.py [--small] [--rows={','.join(STUDENT_ROWS + REF_ROWS)}] [--seed=N]; got {a}")
    unknown = set(args['rows']) - set(STUDENT_ROWS + REF_ROWS)
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}")
    return args

def prepare_data(cfg, out, seed):
    """Weights, corpus, and the labeled / unlabeled split of train (the unlabeled manifest has no "text")."""
    teacher.assemble_weights('weights')
    if not os.path.exists(os.path.join(cfg['corpus'], 'test.jsonl')):
        data.synth_corpus(cfg['corpus'], text='fortunes', n_train=cfg['n_train'], n_val=cfg['n_val'],
                          n_test=cfg['n_test'], holdout_voices=2, seed=CORPUS_SEED)
    train = data.read_manifest(os.path.join(cfg['corpus'], 'train.jsonl'))
    n_lab = max(1, int(cfg['label_frac'] * len(train)))
    labeled = train[:n_lab]
    unlabeled = [{k: v for k, v in r.items() if k != 'text'} for r in train[n_lab:n_lab + cfg['n_unlabeled']]]
    os.makedirs(out, exist_ok=True)
    paths = {'labeled': os.path.join(out, 'labeled.jsonl'), 'unlabeled': os.path.join(out, 'unlabeled.jsonl'),
             'val': os.path.join(cfg['corpus'], 'val.jsonl'), 'test': os.path.join(cfg['corpus'], 'test.jsonl')}
    data.write_manifest(paths['labeled'], labeled)
    data.write_manifest(paths['unlabeled'], unlabeled)
    print(f"demo data: {len(labeled)} labeled + {len(unlabeled)} unlabeled train utterances, "
          f"{len(data.read_manifest(paths['test']))} test -> {out}")
    return paths

def encoder_cache(model):
    """The frozen base encoder's outputs, shared by the teacher and every student row, computed once per clip and kept
    on disk (float16) for later rows and runs. Under bf16 autocast on CPU: ~2x faster than float32 here, outputs within
    ~2% (relative norm); the teacher row is decoded from the same outputs as the students."""
    ctx = torch.autocast('cpu', torch.bfloat16) if torch.device(model.encoder.conv1.weight.device).type == 'cpu' \
        else torch.autocast('cuda', torch.bfloat16)
    return distill.EncoderCache(model.encoder, True, CACHE_DIR, ctx)

def encode_all(paths, batch_size=8):
    """Stage 'encode': fill the encoder cache for every clip the rows read (labeled, unlabeled, val, test)."""
    model, _ = evaluate.load_checkpoint('weights/base')
    cache = encoder_cache(model)
    for name in ('labeled', 'unlabeled', 'val', 'test'):
        rows = data.read_manifest(paths[name])
        for batch in data.Batches(rows, None, batch_size=batch_size, n_mels=model.dims.n_mels, n_frames=data.N_FRAMES,
                                  shuffle=False):
            cache(batch['mel'], batch['audio'])
    return cache

def row_config(row, cfg, paths, out, seed):
    """distill() overrides of one student row; rows after base start from base's (or td's) checkpoint. Every row trains
    the 2 decoder layers only: the encoder and the (tied) token and position embeddings stay the teacher's."""
    common = dict(teacher_path='weights/base', student_layers=2, freeze_encoder=True, freeze_embeddings=True, seed=seed,
                  encoder_cache_dir=CACHE_DIR, out_dir=os.path.join(out, row), batch_size=cfg['batch_size'],
                  val_manifest=paths['val'] if cfg['val_max_utts'] else '', val_max_utts=max(cfg['val_max_utts'], 1),
                  log_interval=5, ngram_stop=4)
    if row == 'base':  # SFT on the labeled few: dropout, and the best val WER's checkpoint (it overfits fast)
        return dict(common, mode='sft', init_from='teacher', train_manifest=paths['labeled'], max_iters=cfg['sft_iters'],
                    learning_rate=cfg['sft_lr'], warmup_iters=10, dropout=0.1, eval_interval=cfg['sft_eval'],
                    batch_size=cfg['sft_batch_size'], token_noise=cfg['token_noise'])
    # the unlabeled rows: the same number of updates each, and their last weights (no selection on val)
    unl = dict(common, train_manifest=paths['unlabeled'], init_from=os.path.join(out, 'base', 'ckpt.pt'),
               max_iters=cfg['iters'], learning_rate=cfg['lr'], warmup_iters=cfg['warmup'], eval_interval=0,
               always_save_checkpoint=True)
    # OPD rows: a rollout cut where a 4-gram repeats gets the unlikelihood loss on that n-gram instead of the KL to a
    # teacher that, forced onto the loop, tends to continue it (without it the opd student looped on 0-3 test clips a seed)
    opd = dict(unl, mode='opd', loop_unlikelihood=3.0)
    if row == 'opd':
        return dict(opd, loss='topk_union', temperature=0.0)
    if row == 'opd_rkl':
        return dict(opd, loss='rkl', temperature=1.0)
    if row == 'td':  # supervised like base, on the teacher's transcripts
        return dict(unl, mode='td', token_noise=cfg['token_noise'])
    if row == 'td_opd':
        return dict(opd, loss='topk_union', temperature=0.0, init_from=os.path.join(out, 'td', 'ckpt.pt'))
    raise ValueError(row)

def train_row(row, cfg, paths, out, seed):
    """Run one student row unless its checkpoint and summary already exist; returns its summary (+ wall seconds)."""
    rdir = os.path.join(out, row)
    summary_path = os.path.join(rdir, 'summary.json')
    if os.path.exists(os.path.join(rdir, 'ckpt.pt')) and os.path.exists(summary_path):
        print(f"{row}: reusing {rdir}/ckpt.pt")
        with open(summary_path) as f:
            return json.load(f)
    overrides = row_config(row, cfg, paths, out, seed)
    if overrides['init_from'] != 'teacher' and not os.path.exists(overrides['init_from']):
        need = 'td' if row == 'td_opd' else 'base'
        raise SystemExit(f"{row} needs {overrides['init_from']}: run --rows={need} first")
    if os.path.exists(os.path.join(rdir, 'log.jsonl')):
        os.remove(os.path.join(rdir, 'log.jsonl'))  # a fresh log for the VUSS summary
    print(f"=== {row}: mode={overrides['mode']}" + (f", loss={overrides.get('loss')}" if overrides['mode'] == 'opd' else ''))
    t0 = time.time()
    summary = distill.distill(overrides)
    summary['wall_s'] = time.time() - t0
    summary['vuss_log'] = vuss_of(os.path.join(rdir, 'log.jsonl'))
    if row in ('opd', 'td_opd'):  # the distilled students, also in openai-whisper's format (whisper.load_model opens it)
        model, tok = evaluate.load_checkpoint(summary['ckpt'])
        summary['whisper_pt'] = os.path.join(rdir, 'whisper.pt')
        teacher.save_pt(model, summary['whisper_pt'], tok)
    with open(summary_path, 'w') as f:
        json.dump(summary, f, indent=1, default=str)
    return summary

def vuss_of(log_path):
    """Mean / min / max of the logged VUSS values of an OPD run (None for other modes)."""
    if not os.path.exists(log_path):
        return None
    with open(log_path) as f:
        vals = [r['vuss'] for r in map(json.loads, f) if 'vuss' in r]
    return {'mean': sum(vals) / len(vals), 'min': min(vals), 'max': max(vals)} if vals else None

def decode_cached(model, tok, rows, cache, batch_size=16):
    """Greedy transcripts like evaluate.transcribe, but from the shared frozen encoder's cached outputs (computed once
    per test utterance for all base-encoder rows: the teacher and every student), as distill's val WER does. Also the
    same transcripts cut at the rollouts' length bound (distill.length_bounds: 8 + 6 tokens per second; greedy decoding
    stopped there gives exactly this prefix), and how many utterances ran past it (a repetition loop, nearly always)."""
    batches = data.Batches(rows, None, batch_size=batch_size, n_mels=model.dims.n_mels, n_frames=data.N_FRAMES,
                           shuffle=False)
    hyps, bounded, over = [None] * len(rows), [None] * len(rows), 0
    model.eval()
    for batch in batches:
        xa = cache(batch['mel'], batch['audio'])
        prompts = [tok.sot_sequence(rows[i].get('lang')) for i in batch['index']]
        with torch.no_grad():
            seqs, _ = distill.rollout(model, xa, prompts, tok, model.dims.n_text_ctx // 2)
        for i, s, n in zip(batch['index'], seqs, distill.length_bounds(batch['duration'].tolist())):
            hyps[i], bounded[i], over = tok.decode(s).strip(), tok.decode(s[:n]).strip(), over + (len(s) > n)
    return hyps, bounded, over

def compression_ratio(text):
    """Whisper's loop detector: how much better than 1x gzip compresses the transcript (a loop compresses well)."""
    b = text.encode('utf-8')
    return len(b) / len(zlib.compress(b)) if b else 0.0

def fallback(model, tok, rows, cache, hyps, threshold=2.4, temperatures=(0.2, 0.4, 0.6, 0.8, 1.0)):
    """Whisper's temperature fallback (transcribe's default; its compression-ratio half, not the log-prob one): an
    utterance whose greedy transcript compresses better than 2.4x is decoded again, sampling at rising temperatures,
    until a transcript does not (else the last one stays). Returns the transcripts and how many were decoded again."""
    out, redone = list(hyps), 0
    for i, h in enumerate(hyps):
        if compression_ratio(h) <= threshold:
            continue
        redone += 1
        batch = data.Batches([rows[i]], None, batch_size=1, n_mels=model.dims.n_mels, n_frames=data.N_FRAMES,
                             shuffle=False).collate([0])
        xa, g = cache(batch['mel'], batch['audio']), torch.Generator().manual_seed(i)
        for T in temperatures:
            seqs, _ = distill.rollout(model, xa, [tok.sot_sequence(rows[i].get('lang'))], tok, model.dims.n_text_ctx // 2,
                                      temperature=T, generator=g)
            out[i] = tok.decode(seqs[0]).strip()
            if compression_ratio(out[i]) <= threshold:
                break
    return out, redone

SCORES = ('wer', 's', 'd', 'i', 'n', 'median_utt_wer')  # what results.json keeps of the bounded and fallback scorings

def row_path(row, out):
    return {'teacher': 'weights/base', 'tiny_en': 'weights/tiny.en'}.get(row, os.path.join(out, row, 'ckpt.pt'))

def evaluate_row(row, out, test_rows, cache):
    """Test WER, S/D/I, median per-utterance WER. tiny_en (its own encoder) goes through evaluate.transcribe; the
    base-encoder rows decode from the cached encoder outputs (their RTFx here is decoder-only; see measure_speed), and are
    also scored cut at the length bound and with Whisper's temperature fallback (see fallback)."""
    path = row_path(row, out)
    if not os.path.exists(path):
        print(f"{row}: no {path}, skipped")
        return None
    model, tok = evaluate.load_checkpoint(path)
    t0 = time.time()
    bounded = None
    if row == 'tiny_en':
        hyps = evaluate.transcribe(model, tok, test_rows, batch_size=16)
    else:
        hyps, bounded, over = decode_cached(model, tok, test_rows, cache)
    wall = time.time() - t0
    res = evaluate.report(test_rows, hyps, wall)
    res.update(eval_wall_s=wall, params=model.get_num_params(), decode='transcribe' if row == 'tiny_en' else 'cached_encoder')
    line = (f"{row}: WER {100 * res['wer']:.2f}% (S {res['s']} D {res['d']} I {res['i']} of {res['n']}), "
            f"median utt {100 * res['median_utt_wer']:.1f}%, {wall:.1f} s")
    if bounded is not None:
        b = evaluate.report(test_rows, bounded, wall)
        res['bounded'] = {k: b[k] for k in SCORES}
        res['bounded']['utts_past_bound'] = over
        line += f"; cut at the length bound {100 * b['wer']:.2f}% (I {b['i']}, {over} utts past it)"
        fb, redone = fallback(model, tok, test_rows, cache, hyps)
        f = evaluate.report(test_rows, fb, wall)
        res['fallback'] = dict({k: f[k] for k in SCORES}, redone=redone)
        line += f"; with Whisper's fallback {100 * f['wer']:.2f}% ({redone} utts decoded again)"
    print(line)
    return res

def measure_speed(student_row, out, rows, cache):
    """Greedy decode speed of the student and the teacher, back to back in this process on the same utterances: RTFx
    (audio seconds / wall seconds) of evaluate.transcribe, encoder included, and the decoder alone (from the cached
    encoder outputs) in ms per emitted token: what the smaller decoder saves (the encoder is the same)."""
    speed = {'student_row': student_row, 'utterances': len(rows)}
    for name, path in (('teacher', row_path('teacher', out)), ('student', row_path(student_row, out))):
        model, tok = evaluate.load_checkpoint(path)
        evaluate.transcribe(model, tok, rows[:2])  # warm-up
        t0 = time.time()
        hyps = evaluate.transcribe(model, tok, rows, batch_size=16)
        res = evaluate.report(rows, hyps, time.time() - t0)
        speed[f'{name}_rtfx'], speed[f'{name}_wall_s'] = res['rtfx'], time.time() - t0
        t0 = time.time()
        hyps = decode_cached(model, tok, rows, cache)[0]
        n_tok = sum(len(tok.encode_text(h)) + 1 for h in hyps)  # + EOT
        speed[f'{name}_decoder_ms_per_token'] = 1000 * (time.time() - t0) / n_tok
    speed['speedup'] = speed['student_rtfx'] / speed['teacher_rtfx']
    speed['decoder_speedup'] = speed['teacher_decoder_ms_per_token'] / speed['student_decoder_ms_per_token']
    return speed

def print_table(results):
    print(f"\n{'row':<9} {'WER%':>7} {'S':>5} {'D':>5} {'I':>5} {'N':>5} {'med%':>6} {'bound%':>7} {'loops':>5} "
          f"{'fallb%':>7} {'VUSS':>6} {'train_s':>8} {'eval_s':>7}")
    for row in REF_ROWS + STUDENT_ROWS:
        r = results.get(row)
        if not r or 'wer' not in r:
            continue
        vuss = f"{r['vuss']['mean']:.2f}" if r.get('vuss') else '-'
        train_s = f"{r['train_wall_s']:.0f}" if r.get('train_wall_s') is not None else '-'
        bd = r.get('bounded')
        bounded = f"{100 * bd['wer']:7.2f} {bd['utts_past_bound']:5d}" if bd else f"{'-':>7} {'-':>5}"
        fb = f"{100 * r['fallback']['wer']:7.2f}" if r.get('fallback') else f"{'-':>7}"
        print(f"{row:<9} {100 * r['wer']:7.2f} {r['s']:5d} {r['d']:5d} {r['i']:5d} {r['n']:5d} "
              f"{100 * r['median_utt_wer']:6.1f} {bounded} {fb} {vuss:>6} {train_s:>8} {r['eval_wall_s']:7.1f}")
    b, t, closes = results.get('base'), results.get('teacher'), {}
    views = (('', '', lambda r: r.get('wer')),
             ('_bounded', ' (cut at the length bound)', lambda r: r.get('bounded', {}).get('wer')),
             ('_fallback', " (with Whisper's fallback)", lambda r: r.get('fallback', {}).get('wer')))
    for key, name, get in views:
        if not (b and t and get(b) is not None and get(t) is not None and get(b) != get(t)):
            continue
        for row in ('opd', 'opd_rkl', 'td', 'td_opd'):
            if get(results.get(row, {})) is not None:
                closed = (get(b) - get(results[row])) / (get(b) - get(t))
                closes[row + key] = closed
                print(f"{row}: closes {100 * closed:.0f}% of the base -> teacher WER gap{name}")
    return closes

def plot(results, out):
    """demo.png: test WER per row, and per step of the OPD rows (from their log.jsonl) the KL to the teacher and VUSS."""
    try:
        import matplotlib
        matplotlib.use('Agg')
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot (pip install matplotlib)")
        return
    rows = [r for r in REF_ROWS + STUDENT_ROWS if results.get(r, {}).get('wer') is not None]
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    ax[0].bar(rows, [100 * results[r]['wer'] for r in rows], color=['C1' if r in REF_ROWS else 'C0' for r in rows])
    ax[0].set_ylabel('test WER (%)')
    ax[0].tick_params(axis='x', rotation=30)
    for row in ('opd', 'opd_rkl', 'td_opd'):
        path = os.path.join(out, row, 'log.jsonl')
        if os.path.exists(path):
            with open(path) as f:
                log = [r for r in map(json.loads, f) if 'kl_st' in r]
            ax[1].plot([r['iter'] for r in log], [r['kl_st'] for r in log], label=row)
            ax[2].plot([r['iter'] for r in log], [r['vuss'] for r in log], label=row)
    ax[1].set(xlabel='step', ylabel='KL(student || teacher) per token', title='on the rollouts')
    ax[2].set(xlabel='step', ylabel='VUSS (k..2k, lower = more overlap)', title='support overlap')
    for a in ax[1:]:
        a.legend()
    fig.suptitle('nanoOPD: Table 1 in miniature')
    fig.tight_layout()
    fig.savefig(os.path.join(out, 'demo.png'), dpi=110)
    plt.close(fig)
    print(f"wrote {os.path.join(out, 'demo.png')}")

def main(argv):
    args = parse_args(argv)
    cfg = SMALL if args['small'] else FULL
    out = OUT + ('_small' if args['small'] else '') + (f"_seed{args['seed']}" if args['seed'] != 1337 else '')
    torch.manual_seed(args['seed'])
    t_all = time.time()
    stages = {}
    t0 = time.time()
    paths = prepare_data(cfg, out, args['seed'])
    stages['data'] = time.time() - t0
    t0 = time.time()
    cache = encode_all(paths)
    stages['encode'] = time.time() - t0
    results_path = os.path.join(out, 'results.json')
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    for row in STUDENT_ROWS:  # in order: later rows start from earlier rows' checkpoints
        if row in args['rows']:
            s = train_row(row, cfg, paths, out, args['seed'])
            stages[f'train_{row}'] = s.get('wall_s')
            results[row] = {'train_wall_s': s.get('wall_s'), 'train_iters': s.get('iter'),
                            'vuss': s.get('vuss_log'), 'summary': s}
    test_rows = data.read_manifest(paths['test'])
    for row in REF_ROWS + STUDENT_ROWS:
        if row in args['rows']:
            t0 = time.time()
            res = evaluate_row(row, out, test_rows, cache)
            stages[f'eval_{row}'] = time.time() - t0
            if res is not None:
                res.pop('utts')  # per-utterance transcripts stay out of the table file
                results[row] = dict(results.get(row, {}), **res)
    student = next((r for r in ('opd', 'td_opd', 'base') if r in args['rows'] and os.path.exists(row_path(r, out))), None)
    if student and 'teacher' in args['rows']:
        t0 = time.time()
        results['speed'] = measure_speed(student, out, test_rows[:cfg['speed_utts']], cache)
        stages['speed'] = time.time() - t0
    stages['total'] = time.time() - t_all
    results['stages_s'] = dict(results.get('stages_s', {}), **stages)
    results['config'] = dict(cfg, seed=args['seed'], small=args['small'])
    results['gap_closed'] = print_table(results)
    if 'speed' in results:
        sp = results['speed']
        print(f"greedy decode speed (one run, {sp['utterances']} utts, encoder included): {sp['student_row']} RTFx "
              f"{sp['student_rtfx']:.1f} vs teacher {sp['teacher_rtfx']:.1f} ({sp['speedup']:.2f}x); decoder alone "
              f"{sp['student_decoder_ms_per_token']:.1f} vs {sp['teacher_decoder_ms_per_token']:.1f} ms/token "
              f"({sp['decoder_speedup']:.2f}x)")
    print('stage seconds: ' + ', '.join(f"{k} {v:.0f}" for k, v in stages.items() if v is not None))
    with open(results_path + '.tmp', 'w') as f:
        json.dump(results, f, indent=1, default=str)
    os.replace(results_path + '.tmp', results_path)
    print(f"wrote {results_path}")
    plot(results, out)
    return results

if __name__ == '__main__':
    main(sys.argv[1:])
