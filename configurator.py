"""
Plain-Python configs, nanoGPT style. A script keeps its settings as module globals; on its
command line come config files (executed in order) and --key=value overrides:

    python train.py config/vitg8.py --batch_size=16 --lr=1e-4

A key that the script does not know, or a value of another type than the default, is an
error that names the file or argument, so a typo never trains the wrong model silently.
--help prints every setting with its default and the comment beside it in the source.
"""

import re
import sys
from ast import literal_eval

SETTING = re.compile(r"^\s*(\w+)\s*(?::[^=]+)?=.*?(?:#\s*(.*))?$")  # `key = value  # comment`, or a dataclass field


def settings_help(defaults, sources):
    """One line per setting: --key=default and the comment on its line in the source files."""
    comments = {}
    for path in sources:
        for line in open(path):
            m = SETTING.match(line)
            if m and m[1] in defaults and m[1] not in comments:
                comments[m[1]] = m[2] or ""
    width = max(len(f"--{k}={v!r}") for k, v in defaults.items())
    return "\n".join(f"  {f'--{k}={v!r}':{width}}  {comments.get(k, '')}".rstrip() for k, v in defaults.items())


def check(key, value, defaults, where):
    if key not in defaults:
        raise SystemExit(f"{where}: unknown setting {key!r}; known: {', '.join(sorted(defaults))}")
    default = defaults[key]
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    raise SystemExit(f"{where}: {key} must be {type(default).__name__} like its default {default!r}, "
                     f"got {type(value).__name__} {value!r}")


def configure(defaults, argv, usage="", sources=()):
    """Return the settings that config files and --key=value arguments in argv change,
    as {key: value}, each checked against `defaults` ({key: default value}). With -h or --help:
    print `usage` and every setting (comments read from `sources`), and exit."""
    if "-h" in argv or "--help" in argv:
        print(f"{usage.strip()}\n\nsettings (config files and --key=value override them):\n{settings_help(defaults, sources)}")
        sys.exit(0)
    changed = {}
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise SystemExit(f"{arg}: write overrides as --key=value")
            try:
                value = literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a bare word is a string: --preset=vitg8
            if isinstance(defaults.get(key), str) and not isinstance(value, str):
                value = text  # a string setting takes the text as typed: --data_weights=3,1
            changed[key] = check(key, value, defaults, arg)
        else:
            try:
                source = open(arg).read()
            except OSError as e:
                raise SystemExit(f"{arg}: cannot read config file ({e.strerror})")
            namespace = {}
            try:
                exec(compile(source, arg, "exec"), namespace)
            except SyntaxError as e:
                raise SystemExit(f"{arg}, line {e.lineno}: {e.msg}") from None
            for key, value in namespace.items():
                if not key.startswith("_") and not callable(value) and not hasattr(value, "__spec__"):
                    changed[key] = check(key, value, defaults, arg)
    for key, value in changed.items():
        print(f"config: {key} = {value!r}")
    return changed
