"""
Poor man's configurator, after nanoGPT. Run as:
$ python train.py config/override_file.py --batch_size=32
The calling script exec's it, so it overrides that script's globals: a config file is plain Python
assigning globals; each --key=value is parsed with literal_eval (else it is a string) and must
name an existing global of the same type (an int is accepted where a float is expected).
"""
import sys
from ast import literal_eval

def _config_fail(msg):  # not _fail: exec puts it among the calling script's globals
    print(f"configurator: {msg}", file=sys.stderr)
    sys.exit(2)

for arg in sys.argv[1:]:
    if '=' not in arg:
        # assume it's the name of a config file
        if arg.startswith('--'):
            _config_fail(f"expected --key=value, got {arg}")
        try:
            config_source = open(arg).read()
        except OSError as e:
            _config_fail(f"cannot read config file {arg}: {e.strerror}")
        print(f"Overriding config with {arg}:")
        print(config_source)
        _before = dict(globals())
        exec(config_source)
        unknown = [k for k in globals() if k not in _before and not k.startswith('_')]
        if unknown:
            _config_fail(f"{arg}: unknown config key(s) {', '.join(unknown)}")
    else:
        # assume it's a --key=value argument
        if not arg.startswith('--'):
            _config_fail(f"expected --key=value, got {arg}")
        key, val = arg.split('=', 1)
        key = key[2:]
        if key not in globals():
            _config_fail(f"unknown config key: {key}")
        try:
            attempt = literal_eval(val)  # e.g. bool, number, list
        except (SyntaxError, ValueError):
            attempt = val  # a plain string
        current = globals()[key]
        if isinstance(current, float) and type(attempt) is int:  # 3 for 3.0, but not True
            attempt = float(attempt)
        if current is not None and type(attempt) != type(current):
            _config_fail(f"--{key}: expected {type(current).__name__}, "
                         f"got {type(attempt).__name__} ({val!r})")
        print(f"Overriding: {key} = {attempt!r}")
        globals()[key] = attempt
