"""configurator.py: overrides, config files, one-line errors for unknown keys and wrong types."""
import subprocess, sys, os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = ("batch_size = 8\nlr = 1e-3\nname = 'x'\ncompile = False\n"
          "exec(open('configurator.py').read())\nprint(batch_size, lr, name, compile)\n")

def run(tmp_path, *args):
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    return subprocess.run([sys.executable, str(script), *args], cwd=ROOT, capture_output=True,
                          text=True)

def test_overrides_and_config_file(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = 4\nname = 'from_file'\n")
    r = run(tmp_path, str(cfg), "--lr=3", "--compile=True")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "4 3.0 from_file True"

def test_unknown_key(tmp_path):
    r = run(tmp_path, "--bach_size=4")
    assert r.returncode != 0 and "unknown config key: bach_size" in r.stderr

def test_wrong_type(tmp_path):
    r = run(tmp_path, "--batch_size=abc")
    assert r.returncode != 0 and "--batch_size: expected int, got str" in r.stderr

def test_unknown_key_in_config_file(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batchsize = 4\n")
    r = run(tmp_path, str(cfg))
    assert r.returncode != 0 and "unknown config key(s) batchsize" in r.stderr

def _one_line_error(r):
    lines = r.stderr.strip().splitlines()
    assert r.returncode != 0 and len(lines) == 1, r.stderr
    return lines[0]

def test_syntax_error_in_config_file(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = 4\nname = 'unclosed\n")
    assert f"{cfg}:2: syntax error" in _one_line_error(run(tmp_path, str(cfg)))

def test_wrong_type_in_config_file(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text('batch_size = "eight"\nlr = 2\n')
    line = _one_line_error(run(tmp_path, str(cfg)))
    assert f"{cfg}: batch_size = 'eight': expected int, got str" in line
    cfg.write_text('lr = 2\ncompile = 1\n')  # an int for a float is fine, for a bool it is not
    assert "compile = 1: expected bool, got int" in _one_line_error(run(tmp_path, str(cfg)))

def test_error_raised_in_config_file(tmp_path):
    cfg = tmp_path / "cfg.py"
    cfg.write_text("batch_size = undefined_name\n")
    assert "NameError" in _one_line_error(run(tmp_path, str(cfg)))
