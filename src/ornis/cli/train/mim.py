"""``ornis train mim``: MAE-style masked image modelling (``ornis.train.mim``)."""

from __future__ import annotations

import argparse

from ornis.cli.common import default_of
from ornis.cli.train.options import add_start_arguments, loop_config, one_or_many, report
from ornis.train.mim import MIM_OPTIM, MIMOptions, train_mim

HELP = "MAE-style masked image modelling on any images (no labels needed)"

OPTIM = MIM_OPTIM
DESCRIPTION = HELP


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's own options, with ``MIMOptions``' defaults."""
    p.add_argument("train", nargs="+", help="any folder of images, or webdataset .tar shards")
    add_start_arguments(
        p,
        "start from a published name or a checkpoint file",
        "start from scratch with this architecture (ornis models)",
        default_of(MIMOptions, "positions"),
        positions_default="the family's MIM paper's: sincos for a ViT (MAE), random for Hiera (Hiera-MAE)",
    )
    p.add_argument(
        "--mask-ratio",
        type=float,
        default=default_of(MIMOptions, "mask_ratio"),
        help="default: 0.75 for ViT, 0.6 for Hiera",
    )
    p.add_argument(
        "--mask-unit",
        type=int,
        default=default_of(MIMOptions, "mask_unit"),
        help="mask unit side in patch tokens (default: the model's)",
    )
    p.add_argument("--decoder-dim", type=int, default=default_of(MIMOptions, "decoder_dim"))
    p.add_argument("--decoder-depth", type=int, default=default_of(MIMOptions, "decoder_depth"))
    p.add_argument("--decoder-heads", type=int, default=default_of(MIMOptions, "decoder_heads"))
    p.add_argument(
        "--no-norm-pix",
        dest="norm_pix",
        action="store_false",
        default=default_of(MIMOptions, "norm_pix"),
        help="predict raw pixels instead of per-patch normalised ones",
    )
    p.add_argument(
        "--crop-scale", type=float, nargs=2, default=default_of(MIMOptions, "crop_scale"), metavar=("MIN", "MAX")
    )


def run(args: argparse.Namespace) -> int:
    """Pretrain, then report the files."""
    opts = MIMOptions(
        train=one_or_many(args.train),
        weights=args.weights,
        arch=args.arch,
        size=args.size,
        model_config=args.model_config,
        positions=args.positions,
        mask_ratio=args.mask_ratio,
        mask_unit=args.mask_unit,
        decoder_dim=args.decoder_dim,
        decoder_depth=args.decoder_depth,
        decoder_heads=args.decoder_heads,
        norm_pix=args.norm_pix,
        crop_scale=tuple(args.crop_scale),
    )
    return report(train_mim(opts, loop_config(args)))
