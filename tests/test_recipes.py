"""Every recipe in config/ loads into its script: each key it sets exists there, with the same type."""
import ast
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = sorted(glob.glob(os.path.join(ROOT, 'config', '*.py')))

def defaults(script):
    """The script's config globals: its top-level constant assignments before `config_keys`."""
    tree = ast.parse(open(os.path.join(ROOT, script)).read())
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == 'config_keys':
            break
        if isinstance(node, ast.Assign):
            for target in node.targets:
                out[target.id] = ast.literal_eval(node.value)
    return out

def test_there_are_recipes_for_both_scripts():
    names = [os.path.basename(r) for r in RECIPES]
    assert any(n.startswith('train_') for n in names) and any(n.startswith('distill_') for n in names)

@pytest.mark.parametrize('recipe', RECIPES, ids=os.path.basename)
def test_recipe_sets_known_keys_of_the_right_type(recipe):
    script = 'train.py' if os.path.basename(recipe).startswith('train_') else 'distill.py'
    known = defaults(script)
    assert {'out_dir', 'learning_rate', 'max_iters'} <= known.keys()
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
    script = 'train.py' if os.path.basename(recipe).startswith('train_') else 'distill.py'
    p = subprocess.run([sys.executable, script, recipe, f'--out_dir={tmp_path}', '--device=cpu',
                        f'--train_manifest={tmp_path}/none.jsonl'], cwd=ROOT, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode != 0 and 'Overriding config with' in p.stdout, p.stdout + p.stderr
    assert 'configurator' not in p.stderr, p.stderr
