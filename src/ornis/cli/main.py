"""Entry point of the ``ornis`` command.

Each sub-command lives in its own module under ``ornis.cli`` with ``register(subparsers)``, which adds its
parser and sets ``func`` (taking the parsed namespace, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from ornis import __version__
from ornis.errors import OrnisError

COMMAND_MODULES = ("models", "convert", "embed", "export", "train", "evaluate", "index", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ornis", description="Pretrained vision-transformer image encoders.")
    parser.add_argument("--version", action="version", version=f"ornis {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"ornis.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"ornis.cli.{name}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
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
