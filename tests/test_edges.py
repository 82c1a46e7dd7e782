"""Bad input at every entry point, as a user (or an attacker) meets it: one line on stderr naming the
file, a non-zero exit, nothing lost. Checkpoints carrying code are refused without running it;
truncated or random checkpoints, too-short clips, bad values, a full disk, a resumed log; and a
from-scratch model decodes a clip the same whatever shares its batch."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

import data
import evaluate
from checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.usefixtures('one_thread')  # tests/conftest.py

TINY = dict(vocab_size=48, n_audio_state=32, n_audio_head=2, n_audio_layer=1, n_audio_ctx=400,
            n_text_state=32, n_text_head=2, n_text_layer=1, n_text_ctx=64, batch_size=4,
            eval_interval=100, log_interval=1, warmup_iters=2, learning_rate=3e-3, val_max_utts=4,
            eval_batch_size=4, device='cpu')

def run(script, **kw):
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONHASHSEED='0')
    cmd = [sys.executable, script] + [f'--{k}={v}' for k, v in kw.items()]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)

def ok(p):
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    return p

def one_line(p, *names):
    """The run failed with exactly one line on stderr, naming each of names; returns it."""
    lines = p.stderr.strip().splitlines()
    assert p.returncode != 0 and len(lines) == 1, p.stderr[-3000:]
    assert all(str(n) in lines[0] for n in names), lines[0]
    return lines[0]

class Payload:
    """What an attacker puts in a .pt: unpickling it runs a command (here: creates a file)."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f'touch {self.marker}',))

@pytest.fixture(scope='module')
def world(tiny_corpus, tmp_path_factory):
    """A real trained checkpoint of train.py, and bad ones beside it."""
    d = tmp_path_factory.mktemp('edges')
    corpus = dict(train_manifest=f'{tiny_corpus}/train.jsonl', val_manifest=f'{tiny_corpus}/val.jsonl')
    ok(run('train.py', out_dir=d / 'good', max_iters=30, **corpus, **TINY))
    good = d / 'good' / 'ckpt.pt'
    real = torch.load(good, weights_only=True)
    torch.save(Payload(d / 'ran'), d / 'payload.pt')
    torch.save(dict(real, extra=Payload(d / 'ran')), d / 'payload_in_real.pt')  # still evaluates
    raw = good.read_bytes()
    (d / 'truncated.pt').write_bytes(raw[:len(raw) // 2])
    (d / 'random.pt').write_bytes(np.random.default_rng(0).bytes(4096))
    return d, corpus, good

BAD = ['payload.pt', 'payload_in_real.pt', 'truncated.pt', 'random.pt']

def entry_points(d, corpus, good, bad):
    """Every way a user hands the project a checkpoint: (script, overrides)."""
    resume = d / f'resume_{bad.stem}'
    resume.mkdir(exist_ok=True)
    shutil.copy(bad, resume / 'ckpt.pt')
    opd = dict(corpus, val_manifest='', max_iters=1, topk=8, max_new_tokens=8, device='cpu')
    return [('evaluate.py', dict(ckpt=bad, manifest=corpus['val_manifest'])),
            ('train.py', dict(corpus, **TINY, init_from=bad, out_dir=d / 'o', max_iters=1)),
            ('train.py', dict(corpus, **TINY, init_from='resume', out_dir=resume, max_iters=1)),
            ('distill.py', dict(opd, teacher_path=bad, init_from=good, out_dir=d / 'o')),
            ('distill.py', dict(opd, teacher_path=good, init_from=bad, out_dir=d / 'o')),
            ('distill.py', dict(opd, teacher_path=good, init_from='resume', out_dir=resume))]

@pytest.mark.slow
@pytest.mark.parametrize('bad', BAD)
def test_bad_checkpoints_are_refused_by_every_entry_point(world, bad):
    d, corpus, good = world
    for script, kw in entry_points(d, corpus, good, d / bad):
        p = run(script, **kw)
        line = one_line(p, script)
        assert str(d / bad) in line or f'resume_{bad[:-3]}' in line, line
        assert not (d / 'ran').exists(), f'{script} ran the payload'

def test_own_checkpoints_still_load(world):
    d, corpus, good = world
    p = ok(run('evaluate.py', ckpt=good, manifest=corpus['val_manifest']))
    assert 'WER' in p.stdout

# -----------------------------------------------------------------------------
# bad clips, manifests and values: found before any work starts

@pytest.fixture(scope='module')
def bad_audio(world, tiny_corpus):
    d = world[0]
    rows = data.read_manifest(f'{tiny_corpus}/train.jsonl')
    sf.write(d / 'short.wav', np.zeros(200, dtype=np.float32), 16000)  # 12.5 ms
    out = {}
    for name, audio in (('short', str(d / 'short.wav')), ('missing', str(d / 'missing.wav'))):
        bad = [dict(r) for r in rows]
        bad[-1]['audio'] = audio  # the last clip: read only at the end of an epoch
        data.write_manifest(d / f'{name}.jsonl', bad)
        out[name] = (d / f'{name}.jsonl', audio)
    return out

@pytest.mark.parametrize('kind', ['short', 'missing'])
def test_bad_clip_stops_every_script_before_it_starts(world, bad_audio, kind):
    d, corpus, good = world
    manifest, audio = bad_audio[kind]
    for script, kw in (('train.py', dict(corpus, **TINY, train_manifest=manifest, out_dir=d / 'c',
                                         max_iters=1)),
                       ('distill.py', dict(corpus, teacher_path=good, init_from=good, device='cpu',
                                           train_manifest=manifest, out_dir=d / 'c', max_iters=1)),
                       ('evaluate.py', dict(ckpt=good, manifest=manifest))):
        line = one_line(run(script, **kw), audio)
        assert ('shorter than one 25-ms analysis window' if kind == 'short' else 'file not found') in line
        assert 'iter 0' not in line
    assert not (d / 'c' / 'ckpt.pt').exists()

def test_load_audio_refuses_a_too_short_clip(world, bad_audio):
    with pytest.raises(ValueError, match='12.5 ms long, shorter than one 25-ms'):
        data.load_audio(bad_audio['short'][1])

def test_missing_test_manifest_fails_before_training(world):
    d, corpus, _ = world
    p = run('train.py', **corpus, **TINY, out_dir=d / 't', max_iters=1, test_manifest=d / 'nope.jsonl')
    one_line(p, d / 'nope.jsonl', 'manifest not found')
    assert 'iter 1' not in p.stdout and not (d / 't' / 'ckpt.pt').exists()

def test_empty_and_non_utf8_manifests(world, tmp_path):
    d, corpus, good = world
    (tmp_path / 'empty.jsonl').write_text('\n')
    data.write_manifest(tmp_path / 'ok.jsonl', data.read_manifest(corpus['val_manifest'])[:2])
    first, second = (tmp_path / 'ok.jsonl').read_bytes().splitlines(keepends=True)
    second = second.replace(b'"text": "', '"text": "\u00e9'.encode('latin-1'))  # not UTF-8
    (tmp_path / 'latin1.jsonl').write_bytes(first + second)
    for script, key, extra in (('evaluate.py', 'manifest', dict(ckpt=good)),
                               ('train.py', 'train_manifest', dict(corpus, **TINY, out_dir=d / 'm'))):
        one_line(run(script, **dict(extra, **{key: tmp_path / 'empty.jsonl'})), 'empty manifest')
        one_line(run(script, **dict(extra, **{key: tmp_path / 'latin1.jsonl'})),
                 f"{tmp_path / 'latin1.jsonl'}:2: not UTF-8")

def test_bad_values_are_one_line(world):
    d, corpus, good = world
    cases = [('train.py', dict(corpus, **dict(TINY, batch_size=-1), out_dir=d / 'v'), 'batch_size=-1'),
             ('distill.py', dict(corpus, teacher_path=good, init_from=good, batch_size=0), 'batch_size=0'),
             ('distill.py', dict(corpus, teacher_path=good, init_from=good, loss='xyz'), "loss='xyz'")]
    if not torch.cuda.is_available():
        cases += [('train.py', dict(corpus, **dict(TINY, device='cuda'), out_dir=d / 'v'), 'CUDA'),
                  ('distill.py', dict(corpus, teacher_path=good, init_from=good, device='cuda'), 'CUDA')]
    for script, kw, what in cases:
        one_line(run(script, **kw), what)

# -----------------------------------------------------------------------------
# nothing lost: a full disk during a save, the log of a resumed run

def test_full_disk_keeps_the_previous_checkpoint(world, tmp_path):
    d, corpus, _ = world
    disk = tmp_path / 'disk'
    disk.mkdir()
    mounted = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=2m', 'tmpfs', str(disk)],
                             capture_output=True).returncode == 0
    try:
        out = disk / 'run'
        ok(run('train.py', **corpus, **TINY, out_dir=out, max_iters=2))
        before = (out / 'ckpt.pt').read_bytes()
        kw = dict(corpus, **TINY, out_dir=out, max_iters=4, init_from='resume')
        if mounted:  # fill the disk but a few kB: the next save cannot fit
            free = shutil.disk_usage(disk).free
            with open(disk / 'filler', 'wb') as f:
                f.write(b'\0' * (free - 16384))
            p = run('train.py', **kw)
        else:  # no tmpfs here: os.write fails like a full disk, part of the file written
            hook = ("import errno, os, runpy, sys\n"
                    "def fsync(fd): raise OSError(errno.ENOSPC, 'No space left on device')\n"
                    "os.fsync = fsync; sys.argv = sys.argv[1:]; runpy.run_path('train.py', run_name='__main__')")
            p = subprocess.run([sys.executable, '-c', hook, 'train.py'] + [f'--{k}={v}' for k, v in kw.items()],
                               cwd=ROOT, capture_output=True, text=True, timeout=600)
        one_line(p, out / 'ckpt.pt', 'No space left on device', 'the previous file is intact')
        assert (out / 'ckpt.pt').read_bytes() == before and not (out / 'ckpt.pt.tmp').exists()
    finally:
        if mounted:
            subprocess.run(['umount', str(disk)])

@pytest.mark.slow
@pytest.mark.parametrize('script', ['train.py', 'distill.py'])
def test_resumed_log_is_cut_back_to_the_checkpoint(world, tmp_path, script):
    d, corpus, good = world
    kw = dict(corpus, **TINY) if script == 'train.py' else dict(
        corpus, teacher_path=good, init_from=good, val_manifest='', log_interval=1, topk=8,
        max_new_tokens=8, device='cpu', eval_interval=0)
    straight, split = tmp_path / 'straight', tmp_path / 'split'
    ok(run(script, **kw, out_dir=straight, max_iters=4, lr_decay_iters=4))
    ok(run(script, **kw, out_dir=split, max_iters=2, lr_decay_iters=4))
    shutil.copy(split / 'ckpt.pt', tmp_path / 'at2.pt')
    ok(run(script, **dict(kw, init_from='resume'), out_dir=split, max_iters=4, lr_decay_iters=4))
    shutil.copy(tmp_path / 'at2.pt', split / 'ckpt.pt')  # as if killed before the iter-4 save
    ok(run(script, **dict(kw, init_from='resume'), out_dir=split, max_iters=4, lr_decay_iters=4))
    iters = lambda out: [r['iter'] for r in map(json.loads, open(out / 'log.jsonl')) if 'loss' in r]
    assert iters(split) == iters(straight) == [1, 2, 3, 4]

# -----------------------------------------------------------------------------
# a from-scratch model pads each batch to its longest clip: the padding is masked

def test_decoding_does_not_depend_on_the_batch(world, tiny_corpus, tmp_path):
    _, _, good = world
    model, tok, _ = load_checkpoint(str(good))
    rows = data.read_manifest(f'{tiny_corpus}/train.jsonl')
    clips = [data.load_audio(r['audio']) for r in rows[:3]]
    long = tmp_path / 'long.wav'  # three clips in one: far longer than the others
    sf.write(long, np.concatenate(clips), 16000)
    rows = rows + [dict(rows[0], audio=str(long), duration=sum(map(len, clips)) / 16000)]
    one = evaluate.decode(model, tok, rows, batch_size=1)[0]
    many = evaluate.decode(model, tok, rows, batch_size=16)[0]
    assert one == many
    assert len({tuple(t) for t in one}) > 1 and max(map(len, one)) > 2  # not a trivial model
    beam1, beam16 = (evaluate.decode(model, tok, rows, batch_size=b, beam=3)[0] for b in (1, 16))
    assert beam1 == beam16
