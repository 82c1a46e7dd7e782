"""
Poor man's configurator, after nanoGPT. Run as:
$ python train.py config/override_file.py --batch_size=32
The calling script exec's it, so it overrides that script's globals: a config file is plain Python
assigning globals; each --key=value is parsed with literal_eval (else it is a string). Either way a
key must name an existing global and keep its type (an int is accepted where a float is expected).
"""
import builtins  # the scripts have a `compile` global (torch.compile on or off)
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
        try:
            exec(builtins.compile(config_source, arg, 'exec'))
        except SyntaxError as e:
            _config_fail(f"{arg}:{e.lineno}: syntax error ({e.msg})")
        except Exception as e:
            _config_fail(f"{arg}: {type(e).__name__}: {e}")
        unknown = [k for k in globals() if k not in _before and not k.startswith('_')]
        if unknown:
            _config_fail(f"{arg}: unknown config key(s) {', '.join(unknown)}")
        for key, current in _before.items():  # the same types as the defaults, as for --key=value
            value = globals()[key]
            if isinstance(current, float) and type(value) is int:
                globals()[key] = value = float(value)
            if isinstance(current, (bool, int, float, str)) and type(value) != type(current):
                _config_fail(f"{arg}: {key} = {value!r}: expected {type(current).__name__}, "
                             f"got {type(value).__name__}")
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
