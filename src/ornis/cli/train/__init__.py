"""``ornis train <recipe>``: the training recipes. Every recipe shares the loop's options (steps, batch, lr
schedule, bf16, EMA, checkpoints, resume: ``options.py``) and adds its own (one module each). Run under
``torchrun --nproc-per-node N`` for DDP."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from types import ModuleType
from typing import Any

from ornis.cli.train import classify, dino_v2, mim
from ornis.cli.train.options import add_loop_arguments
from ornis.utils.distributed import close_distributed

DESCRIPTION = """Train or fine-tune an encoder with one of the recipes below. Every recipe writes checkpoints in the
published format (ornis.load_pretrained_model(path) and `ornis embed` read them) plus a *_states.pt file to resume
from (--resume). For several GPUs: torchrun --nproc-per-node N $(which ornis) train RECIPE ..."""

# recipe name -> its module: HELP, add_arguments(parser), run(args) -> exit code
RECIPES: dict[str, ModuleType] = {"classify": classify, "mim": mim, "dino-v2": dino_v2}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ornis train`` and one sub-command per recipe."""
    parser = subparsers.add_parser(
        "train",
        help="train or fine-tune encoders (classify, mim, dino-v2)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    recipes = parser.add_subparsers(dest="recipe", metavar="RECIPE")
    for name, module in RECIPES.items():
        p = recipes.add_parser(
            name, help=module.HELP, description=module.DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        module.add_arguments(p)
        add_loop_arguments(p, module.OPTIM)
        p.set_defaults(func=_closing_the_group(module.run))
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _closing_the_group(run: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """``run``, then the process group the loop joined under torchrun is torn down."""

    def call(args: argparse.Namespace) -> Any:
        try:
            return run(args)
        finally:
            close_distributed()

    return call
