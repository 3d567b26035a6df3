"""The bad-input contract of the command-line tools (docs/reliability.md, "Bad input"): one line on stderr
saying what is wrong and what to do, exit 2, no traceback, nothing written before every check has passed.

argparse's own error() prints the whole usage block first; Parser prints the one line only (the usage is one
`--help` away), so a mistyped flag reads the same as any other refused value.
"""
import argparse
import math
import sys

BAD_INPUT = 2  # the exit code of refused input, as train.py's


def fail(prog, msg):
    """Refuse the input: `prog: error: msg` on stderr, exit 2."""
    msg = ' '.join(str(msg).split('\n'))  # one line, even when it quotes a multi-line exception
    print(f'{prog}: error: {msg}', file=sys.stderr)
    sys.exit(BAD_INPUT)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (and --help as usual)."""

    def error(self, message):
        fail(self.prog, f'{message} (python {self.prog} --help lists the arguments)')


def positive_int(text):
    """argparse type: an integer >= 1."""
    return _int_at_least(text, 1)


def non_negative_int(text):
    """argparse type: an integer >= 0."""
    return _int_at_least(text, 0)


def _int_at_least(text, low):
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not an integer') from None
    if v < low:
        raise argparse.ArgumentTypeError(f'{v} must be >= {low}')
    return v


def positive_float(text):
    """argparse type: a finite float > 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'{text!r} is not a number') from None
    if not (math.isfinite(v) and v > 0):
        raise argparse.ArgumentTypeError(f'{text} must be a finite number > 0')
    return v


def int_list(text, low=1):
    """Check a comma list of integers >= low; returns the list."""
    items = text.split(',')
    out = []
    for it in items:
        try:
            v = int(it)
        except ValueError:
            raise argparse.ArgumentTypeError(f'{text!r}: {it!r} is not an integer (a comma list of integers, '
                                             f'e.g. 64,128)') from None
        if v < low:
            raise argparse.ArgumentTypeError(f'{text!r}: {v} must be >= {low}')
        out.append(v)
    return out


def names_list(text, known, what, allow_empty=False):
    """Check a comma list of names from `known`; returns the list (empty items dropped)."""
    names = [n for n in text.split(',') if n]
    if not names and not allow_empty:
        raise argparse.ArgumentTypeError(f'{text!r}: name at least one {what} of {", ".join(known)}')
    unknown = [n for n in names if n not in known]
    if unknown:
        raise argparse.ArgumentTypeError(f'unknown {what} {", ".join(map(repr, unknown))}: choose from '
                                         f'{", ".join(known)}')
    return names
