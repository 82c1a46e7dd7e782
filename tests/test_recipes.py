"""Every recipe in config/ loads into its script: each key it sets exists there, with the same
type. demo.py's student rows run their recipes as they are, adding only paths and the seed."""
import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))
# a recipe's script by its name, and the arguments that make the script stop at missing data
SCRIPTS = {'train_': ('train.py', ['--device=cpu', '--train_manifest={tmp}/none.jsonl']),
           'distill_': ('distill.py', ['--device=cpu', '--train_manifest={tmp}/none.jsonl']),
           'adapt_': ('adapt.py', ['--manifest={tmp}/none.jsonl'])}

def script_of(recipe):
    return next(v for k, v in SCRIPTS.items() if os.path.basename(recipe).startswith(k))

def defaults(script):
    """The script's config globals: its top-level lower-case constant assignments before
    `config_keys`."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == 'config_keys':
            break
        if isinstance(node, ast.Assign) and node.targets[0].id[0].islower():
            for target in node.targets:
                out[target.id] = ast.literal_eval(node.value)
    return out

def test_there_are_recipes_for_both_scripts():
    names = [os.path.basename(r) for r in RECIPES]
    assert all(any(n.startswith(k) for n in names) for k in SCRIPTS)
    assert all(any(n.startswith(k) for k in SCRIPTS) for n in names)

@pytest.mark.parametrize('recipe', RECIPES, ids=os.path.basename)
def test_recipe_sets_known_keys_of_the_right_type(recipe):
    script = script_of(recipe)[0]
    known = defaults(script)
    assert 'out_dir' in known
    values = {}
    exec(open(recipe).read(), {}, values)
    assert values, recipe
    for key, value in values.items():
        assert key in known, f"{recipe}: {key} is not a {script} knob"
        expected = type(known[key])
        ok = isinstance(value, expected) or (expected is float and type(value) is int)
        assert ok, f"{recipe}: {key} = {value!r}, {script} has {expected.__name__}"

@pytest.mark.parametrize('recipe', RECIPES, ids=os.path.basename)
def test_script_accepts_recipe(recipe, tmp_path):
    """The script itself reads the recipe (configurator.py), then stops at the missing data."""
    script, args = script_of(recipe)
    p = subprocess.run([sys.executable, script, recipe, f'--out_dir={tmp_path}'] +
                       [a.format(tmp=tmp_path) for a in args], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and 'Overriding config with' in p.stdout, p.stdout + p.stderr
    assert 'configurator' not in p.stderr, p.stderr

# -----------------------------------------------------------------------------
# The demo runs these recipes: every setting of a student row comes from its recipe; demo.py adds
# only this run's paths and the seed (and, in the smoke run, the sizes)
DEMO_PATHS = {'out_dir', 'init_from', 'train_manifest', 'val_manifest', 'encoder_cache_dir'}
SMOKE_SIZES = {'max_iters', 'batch_size', 'eval_interval', 'val_max_utts'}
# The settings each demo row trains with (README's and RESULTS.md's Table 1 figures come from
# them); a recipe that changes one must change this table too, on purpose
_COMMON = dict(val_max_utts=150, eval_batch_size=32, log_interval=5)
_SUPERVISED = dict(_COMMON, lowercase=False, cpu_bf16=True, weight_decay=0.005, beta2=0.95,
                   min_lr=1e-5, token_noise=0.3)
_UNLABELED = dict(_COMMON, max_iters=100, learning_rate=3e-4, warmup_iters=5, batch_size=16,
                  always_save_checkpoint=True)
_OPD = dict(_UNLABELED, teacher_path='weights/base', eval_interval=0, ngram_stop=4,
            loop_unlikelihood=3.0)
DEMO_ROWS = {
    'base': dict(_SUPERVISED, init_from='weights/base', student_layers=2, freeze_embeddings=True,
                 max_iters=400, learning_rate=2e-4, warmup_iters=10, dropout=0.1,
                 eval_interval=50, batch_size=8),
    'opd': _OPD,
    'opd_pure': dict(_OPD, ngram_stop=0, loop_unlikelihood=0.0),
    'opd_rkl': dict(_OPD, loss='rkl', temperature=1.0),
    'td': dict(_SUPERVISED, **_UNLABELED, eval_interval=10 ** 6),
    'td_opd': _OPD,
    'dw': dict(_SUPERVISED, **_UNLABELED, eval_interval=10 ** 6, token_noise=0.0,
               teacher_path='weights/base', kl_weight=1.0, kl_tau=2.0),
    'ark_base': dict(_SUPERVISED, student='audio_llm', init_from='weights/base', student_layers=2,
                     lm_lr_scale=0.1, freeze_embeddings=True, max_iters=800, learning_rate=3e-3,
                     warmup_iters=10, eval_interval=200, batch_size=16),
    'ark_opd': dict(_OPD, max_iters=160, learning_rate=1e-4),
    'ark_td': dict(_SUPERVISED, **dict(_UNLABELED, max_iters=160, learning_rate=1e-4),
                   eval_interval=10 ** 6),
    'ark_td_opd': dict(_OPD, max_iters=160, learning_rate=1e-4),
}

def demo_runs(monkeypatch, small):
    """demo.recipe_run for every student row, as the full demo (or the smoke run) would call it."""
    import demo  # importing it runs nothing: its configurator and main are behind __main__
    monkeypatch.setattr(demo, 'small', small)
    monkeypatch.setattr(demo, 'cfg', demo.SMALL if small else demo.FULL)
    paths = {n: f'out/demo/{n}.jsonl' for n in ('labeled', 'unlabeled', 'ark_train',
                                                   'ark_unlabeled', 'val')}
    assert set(demo.STUDENT_ROWS) == set(DEMO_ROWS)
    return {row: demo.recipe_run(row, paths) for row in demo.STUDENT_ROWS}

def effective(script, recipe, overrides):
    """The script's config after the recipe and the --key=value overrides (configurator.py)."""
    known, values = defaults(script), {}
    exec(open(os.path.join(ROOT, recipe)).read(), {}, values)
    return {k: v for d in (known, values, overrides) for k, v in d.items()}

@pytest.mark.parametrize('row', sorted(DEMO_ROWS))
def test_demo_row_runs_its_recipe_as_it_is(row, monkeypatch):
    script, recipe, overrides = demo_runs(monkeypatch, small=False)[row]
    assert os.path.exists(os.path.join(ROOT, recipe)), recipe
    assert script == ('train.py' if os.path.basename(recipe).startswith('train_') else 'distill.py')
    extra = set(overrides) - DEMO_PATHS - {'seed'}
    assert not extra, f"{row}: demo.py sets {sorted(extra)}: they belong in {recipe}"
    assert overrides['out_dir'].endswith(row) and 'seed' in overrides  # its own dir, its seed
    # every knob of the script, not only the ones the table names: a recipe setting one more
    # (a loss, a weight decay) fails here too
    want = {**defaults(script), **DEMO_ROWS[row], **overrides}
    got = effective(script, recipe, overrides)
    assert got == want, {k: (got[k], want[k]) for k in got if got[k] != want[k]}

def test_demo_smoke_run_overrides_only_sizes(monkeypatch):
    for row, (script, recipe, overrides) in demo_runs(monkeypatch, small=True).items():
        extra = set(overrides) - DEMO_PATHS - {'seed'} - SMOKE_SIZES
        assert not extra, f"{row}: the smoke run sets {sorted(extra)}"
        assert overrides['max_iters'] < DEMO_ROWS[row]['max_iters']
