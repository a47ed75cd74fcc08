"""What every command spells the same way: the output option, defaults read from the library's dataclasses,
argument types that refuse out-of-range values at the command line, and the check that an output can be written
before the work starts."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import inspect
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ornis.utils.fs import refuse_special


def add_output_argument(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    help: str,
    *,
    required: bool = True,
    default: str | None = None,
    metavar: str = "PATH",
    aliases: tuple[str, ...] = (),
) -> None:
    """``-o/--output`` for whatever a command writes; ``aliases`` keeps a command's older spellings working
    (``--out``, ``--output-file``). The value lands in ``args.output``."""
    if default is not None:
        help = f"{help} (default: {default})"
    parser.add_argument(
        "-o", "--output", *aliases, dest="output", required=required, default=default, metavar=metavar, help=help
    )


def default_of(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``: a command's default is the library's, never a copy."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            if f.default_factory is not dataclasses.MISSING:
                return f.default_factory()
            raise ValueError(f"{cls.__name__}.{name} has no default")
    raise AttributeError(f"{cls.__name__} has no field {name!r}")


def default_arg(func: Any, name: str) -> Any:
    """The default of parameter ``name`` of ``func``: for library functions whose options are keyword arguments."""
    parameter = inspect.signature(func).parameters[name]
    if parameter.default is inspect.Parameter.empty:
        raise ValueError(f"{func.__qualname__}({name}) has no default")
    return parameter.default


def _number(kind: type, text: str, minimum: float | None, maximum: float | None, inclusive_min: bool) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and value != value:
        raise argparse.ArgumentTypeError("nan is not a number")
    if minimum is not None and (value < minimum or (value == minimum and not inclusive_min)):
        raise argparse.ArgumentTypeError(f"{text} must be {'at least' if inclusive_min else 'above'} {minimum}")
    if maximum is not None and value > maximum:
        raise argparse.ArgumentTypeError(f"{text} must be at most {maximum}")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _number(int, text, 1, None, True)


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _number(int, text, 0, None, True)


def positive_float(text: str) -> float:
    """argparse type: a number > 0."""
    return _number(float, text, 0.0, None, False)


def non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    return _number(float, text, 0.0, None, True)


def fraction(text: str) -> float:
    """argparse type: a number in (0, 1)."""
    value = _number(float, text, 0.0, None, False)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be below 1")
    return value


def probability(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    return _number(float, text, 0.0, 1.0, True)


def int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= ``minimum``."""

    def parse(text: str) -> int:
        return _number(int, text, minimum, None, True)

    parse.__name__ = f"integer >= {minimum}"  # argparse names the type in its "invalid ... value" message
    return parse


def cosine(text: str) -> float:
    """argparse type: a cosine similarity, a number in [-1, 1]."""
    return _number(float, text, -1.0, 1.0, True)


def _os_error(code: int, path: Path) -> OSError:
    return OSError(code, os.strerror(code), str(path))


def check_writable(path: str | os.PathLike, *, folder: bool = False) -> Path:
    """Refuse, before any work, an output that cannot be written: ``path`` (a file, or with ``folder=True`` a folder)
    exists as the other kind, a part of its parent is a file, or its nearest existing folder does not take a new file
    (permissions, read-only file system; tried by creating and removing one, so it holds for root too). Raises the
    ``OSError`` the write would have raised later, naming the path (``OrnisError`` for a special file such as
    ``/dev/null``); returns ``path``. Creates nothing."""
    path = Path(path)
    if path.exists() and folder != path.is_dir():
        raise _os_error(errno.ENOTDIR if folder else errno.EISDIR, path)
    if not folder:
        refuse_special(path)  # /dev/null, a FIFO: OrnisError, never replaced by the atomic rename
    where = path if folder and path.is_dir() else path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    if not where.is_dir():
        raise _os_error(errno.ENOTDIR, where)
    try:
        fd, probe = tempfile.mkstemp(prefix=".ornis-write-check-", dir=where)
    except OSError as e:
        raise OSError(e.errno, e.strerror, str(where)) from None
    os.close(fd)
    os.unlink(probe)
    return path
