"""bench.py versus: two models on the same clips in one run, WER and greedy speed side by side."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def test_versus_scores_both_models_on_the_same_clips(weights, tiny_corpus):
    tiny = os.path.join(weights, 'tiny.en')
    manifest = os.path.join(tiny_corpus, 'test.jsonl')
    p = subprocess.run([sys.executable, 'bench.py', 'versus', f'--ckpt={tiny}', f'--ref={tiny}',
                        f'--manifest={manifest}'], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr
    rows = [line.split() for line in p.stdout.splitlines() if line.startswith(tiny)]
    assert len(rows) == 2
    assert rows[0][1:6] == rows[1][1:6]  # one model twice: the same WER, S, D, I and size
    assert float(rows[0][1]) < 100 and float(rows[0][6]) > 0  # a transcript, and its RTFx
    assert re.search(r'^speed .+: \d+\.\d\dx$', p.stdout, re.M)
