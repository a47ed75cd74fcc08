"""Entry point of the ``ornis`` command.

Each sub-command lives in its own module under ``ornis.cli`` with ``register(subparsers)``, which adds its parser
and sets ``func`` (taking the parsed namespace, returning an exit code). The modules are imported by name here, so
a command whose module fails to import is an error at start-up, never a command that silently goes missing.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ornis._version import __version__
from ornis.cli import convert, demo, embed, evaluate, export, index, models, train
from ornis.errors import OrnisError

COMMANDS = (models, convert, embed, export, train, evaluate, index, demo)


def build_parser() -> argparse.ArgumentParser:
    """The ``ornis`` parser with every sub-command registered."""
    parser = argparse.ArgumentParser(prog="ornis", description="Pretrained vision-transformer image encoders.")
    parser.add_argument("--version", action="version", version=f"ornis {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except OrnisError as e:
        print(f"ornis: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ornis: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
