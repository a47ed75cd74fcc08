"""Entry point of the ``ornis`` command.

Each sub-command lives in its own module under ``ornis.cli`` with ``register(subparsers)``, which adds its parser
and sets ``func`` (taking the parsed namespace, returning an exit code). The modules are imported by name here, so
a command whose module fails to import is an error at start-up, never a command that silently goes missing.

Errors. A user mistake ends in exactly one line on stderr, ``ornis: error: WHAT`` (argparse's own
``ornis COMMAND: error: WHAT`` after the usage line for a malformed command line), and an exit code:

- 2, usage: the command line could not be parsed (argparse), or a library function refused the value of an argument
  (``ValueError`` / ``TypeError``: the library raises them, naming the argument, for a value out of range or of the
  wrong kind, and for nothing else);
- 1, failure: everything ornis refuses on purpose (``OrnisError``: a file that is not what it should be, an unknown
  model, a checksum mismatch, ...), an operating-system error (``OSError``: no such file, permission denied,
  read-only file system, disk full, is a directory; printed as ``PATH: reason``), and anything unexpected (its type
  and first line, with a hint to run again with ``--debug``);
- 130: interrupted (Ctrl-C); 141: stdout was closed early (``ornis models list | head``), silently.

``--debug`` (anywhere on the command line, or ``ORNIS_DEBUG=1``) prints the traceback above the error line; ``-v``
logs debug messages.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
import traceback

from ornis._version import __version__
from ornis.cli import convert, demo, embed, evaluate, export, index, models, train
from ornis.errors import OrnisError

COMMANDS = (models, convert, embed, export, train, evaluate, index, demo)

USAGE, FAILURE, INTERRUPTED, BROKEN_PIPE = 2, 1, 130, 141
MESSAGE_LIMIT = 2000  # characters of an error line; a longer message is cut (--debug shows it whole)
DEBUG_FLAG = "--debug"


def build_parser() -> argparse.ArgumentParser:
    """The ``ornis`` parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="ornis", description="Pretrained vision-transformer image encoders.")
    parser.add_argument("--version", action="version", version=f"ornis {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    parser.add_argument(
        DEBUG_FLAG, action="store_true", help="print the traceback of an error (anywhere on the command line)"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def _split_debug(argv: list[str]) -> tuple[list[str], bool]:
    """``argv`` without ``--debug`` (accepted after the command too, where argparse would not know it), and whether
    it was there. Arguments after ``--`` are left alone."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = [a for a in argv[:end] if a != DEBUG_FLAG]
    return head + argv[end:], len(head) < end or os.environ.get("ORNIS_DEBUG", "") not in ("", "0")


def one_line(text: str, limit: int = MESSAGE_LIMIT) -> str:
    """``text`` as a single line: its lines joined with ``"; "``, cut at ``limit`` characters."""
    line = "; ".join(part.strip() for part in str(text).splitlines() if part.strip())
    if len(line) > limit:
        line = f"{line[:limit]}... ({len(line) - limit} more characters; --debug shows all)"
    return line


def os_error_message(e: OSError) -> str:
    """``PATH: reason`` for an operating-system error (both paths of a rename or copy), e.g.
    ``out/x.json: Permission denied``, ``No space left on device`` when the error names no file."""
    reason = e.strerror or (errno.errorcode.get(e.errno, "") if e.errno else "") or str(e) or type(e).__name__
    paths = [os.fsdecode(p) for p in (e.filename, e.filename2) if p is not None]
    return f"{' -> '.join(paths)}: {reason}" if paths else reason


def unwrapped(e: BaseException) -> BaseException:
    """The error as a DataLoader worker raised it: torch re-raises it in the main process as the same type, with the
    worker's traceback for a message (``Caught X in DataLoader worker process 0. Original Traceback ...``)."""
    text = str(e)
    if not text.startswith(f"Caught {type(e).__name__} in DataLoader worker"):
        return e
    kind = type(e)
    name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
    _, found, message = text.rpartition(f"\n{name}: ")
    try:
        return kind(message.strip()) if found else e
    except Exception:  # noqa: BLE001 - a type torch could build from one message but this one cannot: keep it whole
        return e


def describe(e: BaseException) -> tuple[int, str]:
    """The exit code and the one-line message of an exception that ended a command (the rule in the docstring)."""
    e = unwrapped(e)
    if isinstance(e, OrnisError):
        return FAILURE, one_line(str(e) or type(e).__name__)
    if isinstance(e, OSError):
        return FAILURE, one_line(os_error_message(e))
    if isinstance(e, (ValueError, TypeError)):
        return USAGE, one_line(str(e) or type(e).__name__)
    return FAILURE, one_line(f"unexpected {type(e).__name__}: {e} (run again with --debug for the traceback)")


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    argv, debug = _split_debug(list(sys.argv[1:] if argv is None else argv))
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse has printed usage and `ornis COMMAND: error: ...` (or --help, --version)
        return 0 if e.code is None else e.code if isinstance(e.code, int) else USAGE
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not (args.verbose or debug):
        # huggingface_hub's retry and resume chatter would come before the one line a failure ends in; it reads
        # this when first imported (a download), and the user's own setting wins
        os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    if not getattr(args, "func", None):
        parser.print_help()
        return USAGE
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print("ornis: error: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`| head`): nothing more to say; point stdout at nothing so the exit flush is quiet
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):  # stdout without a file descriptor (captured in-process)
            pass
        return BROKEN_PIPE
    except Exception as e:  # noqa: BLE001 - the one place every error becomes one line
        if debug:
            traceback.print_exc()
        code, message = describe(e)
        print(f"ornis: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
