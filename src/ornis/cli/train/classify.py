"""``ornis train classify``: supervised classification (``ornis.train.supervised``)."""

from __future__ import annotations

import argparse

from ornis.cli.common import default_of
from ornis.cli.train.options import add_start_arguments, loop_config, one_or_many, report
from ornis.train.supervised import ClassifyOptions, ClassifyRecipe, train_classifier

HELP = "supervised classification: fine-tune a checkpoint on new classes or train from scratch"

OPTIM = ClassifyRecipe.optim_defaults
DESCRIPTION = f"""{HELP}.

The default lr is MAE's fine-tuning rule, {OPTIM.base_lr:g} x batch / {OPTIM.reference_batch}, meant for fine-tuning.
From scratch at small batches it is low: a ViT-Tiny on 1,400 digits at batch 32 reached 0.645 top-1 in 1,500 steps
at the default (1.25e-4) and 0.924 with --lr 1e-3 (layer decay 0.8 in both)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's own options, with ``ClassifyOptions``' defaults."""
    p.add_argument("train", nargs="+", help="a folder of <class>/<image>, or webdataset .tar shards (.cls labels)")
    p.add_argument("--val", default=None, help="validation folder (same class names) for top-1 / top-5")
    add_start_arguments(
        p,
        "start from a published name or a checkpoint file",
        "start from scratch with this architecture (ornis models)",
        default_of(ClassifyOptions, "positions"),
    )
    p.add_argument(
        "--aug",
        choices=["randaugment", "trivialaugment", "none"],
        default=default_of(ClassifyOptions, "auto_augment") or "none",
    )
    p.add_argument(
        "--crop-scale", type=float, nargs=2, default=default_of(ClassifyOptions, "crop_scale"), metavar=("MIN", "MAX")
    )
    p.add_argument(
        "--no-hflip",
        dest="hflip",
        action="store_false",
        help="no random horizontal flips (for images whose mirror is another class: digits, text, arrows)",
    )
    p.add_argument(
        "--mixup", type=float, default=default_of(ClassifyOptions, "mixup_alpha"), help="mixup alpha (0: off)"
    )
    p.add_argument(
        "--cutmix", type=float, default=default_of(ClassifyOptions, "cutmix_alpha"), help="cutmix alpha (0: off)"
    )
    p.add_argument("--label-smoothing", type=float, default=default_of(ClassifyOptions, "label_smoothing"))


def run(args: argparse.Namespace) -> int:
    """Train, then report the files and the validation numbers."""
    opts = ClassifyOptions(
        train=one_or_many(args.train),
        val=args.val,
        weights=args.weights,
        arch=args.arch,
        size=args.size,
        model_config=args.model_config,
        positions=args.positions,
        auto_augment=None if args.aug == "none" else args.aug,
        crop_scale=tuple(args.crop_scale),
        hflip=args.hflip,
        mixup_alpha=args.mixup,
        cutmix_alpha=args.cutmix,
        label_smoothing=args.label_smoothing,
    )
    result, metrics = train_classifier(opts, loop_config(args))
    return report(result, metrics)
