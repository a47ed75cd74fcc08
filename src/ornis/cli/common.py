"""What every command spells the same way: the output option, and defaults read from the library's dataclasses."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
from typing import Any


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
