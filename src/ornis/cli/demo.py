"""``ornis demo``: the first run, offline. Classifies and embeds the sample images that ship with ornis using the
model that ships with it, shows their nearest neighbours and measures accuracy on a generated held-out set."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("demo", help="offline first run with the shipped model and sample images",
                              description=__doc__)
    p.add_argument("-o", "--out", default="ornis-demo", help="output folder for the Parquet files (default ./ornis-demo)")
    p.add_argument("--held-out", type=int, default=400, help="generated held-out images to measure on (default 400)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ornis.eval.demo import run_demo

    print(run_demo(args.out, held_out=args.held_out).format())
    return 0
