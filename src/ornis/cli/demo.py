"""``ornis demo``: the first run, offline. Classifies and embeds the sample images that ship with ornis using the
model that ships with it, shows their nearest neighbours and measures accuracy on a generated held-out set."""

from __future__ import annotations

import argparse
from typing import Any

from ornis.cli.common import add_output_argument, check_writable, default_arg, int_at_least
from ornis.eval.demo import run_demo


def register(subparsers: Any) -> None:
    """Add ``ornis demo``."""
    p = subparsers.add_parser(
        "demo", help="offline first run with the shipped model and sample images", description=__doc__
    )
    add_output_argument(
        p, "output folder for the Parquet files", required=False, default="ornis-demo", aliases=("--out",)
    )
    held_out = default_arg(run_demo, "held_out")
    p.add_argument(
        "--held-out",
        type=int_at_least(2),
        default=held_out,
        help=f"generated held-out images to measure on, at least 2 (default {held_out})",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Run the demo and print its report (the output folder checked to be writable first)."""
    check_writable(args.output, folder=True)
    print(run_demo(args.output, held_out=args.held_out).format())
    return 0
