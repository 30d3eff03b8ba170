"""What counts as the user's mistake, and how the `nemo-tst` command says it.

Every check raises an ordinary exception naming the setting and the fix: `ValueError` for a
bad value or combination, `OSError` (FileNotFoundError, PermissionError, ...) for a file that
cannot be used, `RuntimeError` for a run that cannot go on (a crashed phase). `nemo-tst` turns
those into one line and exit status 1; a command-line usage error (`UsageError`, raised by
`ArgumentParser`) exits 2. Anything else is a bug in nemo-tst and keeps its traceback.
`NEMO_TST_DEBUG=1` shows the traceback of a user error too.
"""

import argparse
import os

__all__ = [
    "DEBUG_ENV", "USER_ERRORS", "ArgumentParser", "UsageError", "debugging", "fraction", "one_line",
    "positive_int",
]

DEBUG_ENV = "NEMO_TST_DEBUG"


class UsageError(Exception):
    """A command line that does not parse: unknown option, missing or mistyped value."""


USER_ERRORS = (ValueError, OSError, RuntimeError, UsageError)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is a `UsageError` (one line, exit 2) instead of the usage
    text and a SystemExit from deep inside the command."""

    def error(self, message):
        raise UsageError(f"{message} (see {self.prog} --help)")


def debugging() -> bool:
    return os.environ.get(DEBUG_ENV, "") not in ("", "0")


def one_line(err: BaseException) -> str:
    """The message of `err` on one line."""
    return " ".join(str(err).split()) or type(err).__name__


def positive_int(text: str) -> int:
    """argparse type: a whole number >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a whole number >= 1")
    return value


def fraction(low: float, high: float, *, low_open=True, high_open=True):
    """argparse type: a finite number in the interval (low, high), ends open or closed."""
    import math

    def parse(text: str) -> float:
        value = float(text)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (math.isfinite(value) and above and below):
            interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            raise argparse.ArgumentTypeError(f"{text} is not in {interval}")
        return value

    parse.__name__ = "number"
    return parse
