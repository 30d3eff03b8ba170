"""What counts as the user's mistake, and how a nemo-tst command says it.

A mistake the user can fix prints one line naming the setting (or the flag that gave a path)
and the fix, with exit status 1; a command line that does not parse exits 2. Those are:

- nemo-tst's own types: `UsageError` (a command line that does not parse, raised by
  `ArgumentParser`), `RunFailed` (a launched run stopped: a crashed phase, a NeMo-Run
  experiment; its log says why), `MissingExtra` (an optional dependency is not installed; the
  message names the pip extra), `PathError` (an operating-system error on a path the user gave:
  `user_paths` names the flag that gave it);
- a `ValueError` or `OSError` raised by nemo-tst's own code: the checks of settings, files and
  run directories raise these, naming the setting and the fix. A library's error that is the
  user's to fix is caught and raised again from nemo-tst's code on purpose (Megatron-LM's
  argument validation, say).

Everything else is a bug and keeps its traceback: a `RuntimeError`, a `ValueError` or `OSError`
raised inside torch, Megatron or another library and not wrapped, any other exception.
`NEMO_TST_DEBUG=1` shows the traceback of a user error too.
"""

import argparse
import contextlib
import errno
import os
import sys
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

__all__ = [
    "DEBUG_ENV", "ArgumentParser", "MissingExtra", "PathError", "RunFailed", "UsageError", "UserError",
    "debugging", "fraction", "is_user_error", "one_line", "positive_int", "run_command", "user_paths",
]

DEBUG_ENV = "NEMO_TST_DEBUG"


class UserError(Exception):
    """Base of nemo-tst's own errors that the user fixes; a command prints them as one line."""


class UsageError(UserError):
    """A command line that does not parse: unknown option, missing or mistyped value."""


class RunFailed(UserError, RuntimeError):
    """A launched run stopped before its end (a crashed phase, a failed NeMo-Run experiment);
    the message says where its output is and how to resume."""


class MissingExtra(UserError, ImportError):
    """An optional dependency the command needs is not installed; the message names the extra
    to install (`pip install 'nemo-tst[hf]'`)."""


class PathError(UserError, OSError):
    """An operating-system error on a path the user gave, naming the flag that gave it:
    `--output-prefix data/corpus: data is a file, not a directory`."""

    def __init__(self, flag: str, path, err: OSError):
        self.flag, self.path = flag, path
        super().__init__(err.errno, f"{flag} {path}: {_reason(err, Path(path))}")

    def __str__(self) -> str:
        return self.strerror


def _reason(err: OSError, path: Path) -> str:
    """What went wrong with `path`, in words: a parent that is a regular file is named as
    such, rather than as the "[Errno 17] File exists" or "Not a directory" the OS reports."""
    if err.errno in (errno.EEXIST, errno.ENOTDIR):
        for parent in reversed(path.parents):  # the outermost one that is not a directory
            if parent != Path(".") and parent.exists() and not parent.is_dir():
                return f"{parent} is a file, not a directory"
    reason = err.strerror or str(err)
    if err.filename is not None and Path(os.fspath(err.filename)) != path:
        reason += f": {os.fspath(err.filename)}"
    return reason


def _relation(filename: Optional[str], path: Path) -> Optional[int]:
    """How closely an OSError on `filename` concerns the user's `path`: 3 the path itself,
    2 something inside it or named by it as a prefix (`--output-prefix data/corpus` writes
    data/corpus_train.bin), 1 one of its parents, None unrelated."""
    if filename is None:
        return None
    where, path = Path(os.path.abspath(filename)), Path(os.path.abspath(path))
    if where == path:
        return 3
    if path in where.parents or (where.parent == path.parent and where.name.startswith(path.name)):
        return 2
    if where in path.parents:
        return 1
    return None


UserPath = Union[str, os.PathLike]


@contextlib.contextmanager
def user_paths(paths: Mapping[str, Union[UserPath, Sequence[UserPath], None]]):
    """Inside, an OSError about a path the user gave ({flag: path, or the paths of a flag
    taking several; None: not given} becomes a `PathError` naming the flag: the path itself,
    a file inside it or named by it, or a parent the command had to create. An OSError with no
    file name (a full disk while writing) names the flag when only one path is given. Any
    other OSError passes unchanged."""
    given = [(flag, Path(path)) for flag, value in paths.items() if value is not None
             for path in (value if isinstance(value, (list, tuple)) else [value])]
    try:
        yield
    except PathError:
        raise
    except OSError as err:
        filename = os.fspath(err.filename) if err.filename is not None else None
        scored = [(_relation(filename, path), len(path.parts), at) for at, (_, path) in enumerate(given)]
        scored = [s for s in scored if s[0] is not None]
        if scored:
            at = max(scored)[2]
        elif filename is None and len(given) == 1:
            at = 0
        else:
            raise
        raise PathError(*given[at], err) from err


def _raised_by_nemo_tst(err: BaseException) -> bool:
    """Whether the innermost frame of `err`'s traceback is nemo-tst's own code (a module of the
    nemo_tst package), not a library's."""
    tb = err.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    module = tb.tb_frame.f_globals.get("__name__", "")
    return module == "nemo_tst" or module.startswith("nemo_tst.")


def is_user_error(err: BaseException) -> bool:
    """Whether a command prints `err` as one line (the module docstring says which errors)."""
    if isinstance(err, UserError):
        return True
    return isinstance(err, (ValueError, OSError)) and _raised_by_nemo_tst(err)


def run_command(prog: str, command: Callable[[], object]) -> int:
    """Run `command` as the command `prog`: 0 when it returns, a user error as one line on
    stderr with status 1 (2 for a usage error), and a bug with its traceback."""
    try:
        command()
    except Exception as err:
        if not is_user_error(err) or debugging():
            raise
        hint = "" if isinstance(err, UsageError) else f" ({DEBUG_ENV}=1 shows the traceback)"
        print(f"{prog}: error: {one_line(err)}{hint}", file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    return 0


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
