"""
The config system train.py and sample.py use, nanoGPT style but checked:

    python train.py config/moe_8e.py --batch_size=32 --compile=False

Arguments are applied in order: a path is a Python config file (its top-level names are config
keys), `--key=value` overrides one key (value parsed as a Python literal, else taken as a string),
and `--flag` alone means `--flag=True` for a key that takes a bool (`--compile`, `--show_routing`).
Every key must already exist in the defaults and keep its type, so a typo or a wrong type stops the
run with one clear message (ConfigError) instead of silently training the wrong thing.
"""
import ast
import dataclasses
import difflib
import os
import types as _types
import typing


class ConfigError(Exception):
    """A bad config file, key or value. The message is meant for the user, as is."""


def _type_names(allowed):
    return ' or '.join('None' if t is type(None) else t.__name__ for t in allowed)


def field_types(cls):
    """{field: accepted types} of a dataclass, from its annotations: Optional[int] -> (int, NoneType);
    a Literal's choices are accepted values (checked by value, not by type)."""
    hints = typing.get_type_hints(cls)
    return {f.name: typing.get_args(hints[f.name]) or (hints[f.name],) for f in dataclasses.fields(cls)}


def _check(key, value, allowed, where):
    """Return value coerced to one of the allowed types (int -> float only), or raise. allowed may
    hold values (a Literal's choices) as well as types."""
    if not isinstance(allowed[0], type):  # a Literal's choices: values, not types
        if any(type(value) is type(c) and value == c for c in allowed):
            return value
        raise ConfigError(f'{where}: {key} must be one of {", ".join(map(repr, allowed))}, got {value!r}')
    if type(value) in allowed:  # exact: a bool is not accepted where an int is meant
        return value
    if float in allowed and type(value) is int:
        return float(value)
    raise ConfigError(f'{where}: {key} must be {_type_names(allowed)}, got {type(value).__name__} {value!r}')


def _unknown(key, known, where):
    close = difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    hint = f" (did you mean '{close[0]}'?)" if close else ' (python train.py --help lists the keys)'
    return ConfigError(f"{where}: unknown config key '{key}'{hint}")


def _parse_value(raw, allowed):
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw  # a bare word: a string (--device=cpu)
    if str in allowed and type(value) not in allowed:
        return raw  # --wandb_run_name=123 means the string '123'
    return value


def _read_file(path):
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    ns = {'__file__': path, '__name__': '__config__'}
    try:
        with open(path) as f:
            code = compile(f.read(), path, 'exec')
        exec(code, ns)  # a config file is trusted Python the user chose to run, as in nanoGPT
    except Exception as e:  # SyntaxError, NameError, ...: one line, not a traceback
        raise ConfigError(f'config file {path} failed to run: {type(e).__name__}: {e}') from None
    return {k: v for k, v in ns.items() if not k.startswith('_')
            and not isinstance(v, (_types.ModuleType, _types.FunctionType, type))}


def load(defaults, argv, types=None):
    """Apply config files and --key=value overrides from argv to a copy of defaults.

    defaults: {key: default value}. types: optional {key: tuple of accepted types}; otherwise a
    key's type is its default's. Returns (config, overridden) where overridden lists the keys that
    were set, in order. Raises ConfigError.
    """
    types = dict(types or {})
    for k, v in defaults.items():
        types.setdefault(k, (type(v),))
    config, overridden = dict(defaults), []

    def apply(key, value, where):
        if key not in defaults:
            raise _unknown(key, list(defaults), where)
        config[key] = _check(key, value, types[key], where)
        if key not in overridden:
            overridden.append(key)

    for arg in argv:
        if arg.startswith('--'):
            key, eq, raw = arg[2:].partition('=')
            if key not in defaults:
                raise _unknown(key, list(defaults), arg)
            if not eq:  # --flag alone: True, for the keys that take a bool (as people write flags)
                if bool not in types[key]:
                    raise ConfigError(f"bad argument '{arg}': overrides are written --key=value "
                                      f'(--{key} alone means True, for True/False keys only)')
                raw = 'True'
            apply(key, _parse_value(raw, types[key]), arg)
        elif arg.startswith('-'):
            raise ConfigError(f"bad argument '{arg}': overrides are written --key=value")
        else:
            for key, value in _read_file(arg).items():
                apply(key, value, arg)
    return config, overridden


def usage(defaults, prog='train.py'):
    lines = [f'usage: python {prog} [config/file.py ...] [--key=value ...] [--flag (= --flag=True)]', '',
             'keys (default):']
    lines += [f'  {k} = {v!r}' for k, v in defaults.items()]
    return '\n'.join(lines)
