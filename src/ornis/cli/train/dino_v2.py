"""``ornis train dino-v2``: DINOv2 self-distillation (``ornis.train.dino_v2``)."""

from __future__ import annotations

import argparse

from ornis.cli.common import default_of
from ornis.cli.train.options import add_start_arguments, loop_config, one_or_many, report
from ornis.train.dino_v2 import DinoV2Config, DinoV2Options, HeadConfig, MultiCropConfig, train_dino_v2

HELP = "DINOv2 self-distillation on any images (no labels): ViT, FlexiViT, HieraDet; from scratch or a checkpoint"

# DinoV2Config fields with an option of the same name (--teacher-temp -> teacher_temp)
METHOD_OPTIONS = (
    "centering",
    "sinkhorn_queue_size",
    "teacher_temp",
    "warmup_teacher_temp",
    "warmup_teacher_temp_steps",
    "momentum_teacher",
    "dino_weight",
    "ibot_weight",
    "koleo_weight",
    "mask_probability",
    "freeze_last_layer_steps",
)
METHOD_HELP = {
    "sinkhorn_queue_size": "earlier teacher outputs (rows per process) joining Sinkhorn-Knopp; helps small batches"
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's own options, with ``DinoV2Config``'s, ``HeadConfig``'s and ``MultiCropConfig``'s defaults."""
    p.add_argument("data", nargs="+", help="any folder of images (no labels, any layout), or .tar shards")
    add_start_arguments(
        p,
        "continue pretraining a published name or a checkpoint file",
        "pretrain this architecture from scratch (ornis models)",
        size=False,
    )
    g = p.add_argument_group("DINOv2")
    g.add_argument(
        "--global-size", type=int, default=default_of(MultiCropConfig, "global_size"), help="global crop size"
    )
    g.add_argument("--local-size", type=int, default=default_of(MultiCropConfig, "local_size"), help="local crop size")
    g.add_argument(
        "--local-crops", type=int, default=default_of(MultiCropConfig, "local_crops"), help="local crops per image"
    )
    g.add_argument(
        "--out-dim", type=int, default=default_of(HeadConfig, "out_dim"), help="prototypes of the DINO / iBOT head"
    )
    g.add_argument("--head-hidden-dim", type=int, default=default_of(HeadConfig, "hidden_dim"))
    g.add_argument("--head-bottleneck-dim", type=int, default=default_of(HeadConfig, "bottleneck_dim"))
    g.add_argument("--head-layers", type=int, default=default_of(HeadConfig, "num_layers"))
    g.add_argument("--separate-ibot-head", action="store_true", help="score patches with their own head")
    for name in METHOD_OPTIONS:
        default = default_of(DinoV2Config, name)
        kind = {"centering": str}.get(name, type(default))
        choices = ["sinkhorn_knopp", "softmax"] if name == "centering" else None
        flag = "--" + name.replace("_", "-")
        g.add_argument(flag, type=kind, default=default, choices=choices, help=METHOD_HELP.get(name))
    g.add_argument("--patch-sizes", type=int, nargs="+", help="FlexiViT: patch sizes to draw from per step")


def options_from_args(args: argparse.Namespace) -> DinoV2Options:
    """The ``DinoV2Options`` the parsed options describe."""
    heads = HeadConfig(
        args.out_dim, args.head_hidden_dim, args.head_bottleneck_dim, args.head_layers, args.separate_ibot_head
    )
    method = DinoV2Config(
        heads=heads,
        patch_sizes=tuple(args.patch_sizes) if args.patch_sizes else None,
        **{name: getattr(args, name) for name in METHOD_OPTIONS},
    )
    crops = MultiCropConfig(args.global_size, args.local_size, args.local_crops)
    return DinoV2Options(
        data=one_or_many(args.data),
        weights=args.weights,
        arch=args.arch,
        model_config=args.model_config,
        method=method,
        crops=crops,
    )


def run(args: argparse.Namespace) -> int:
    """Pretrain, then report the files."""
    return report(train_dino_v2(options_from_args(args), loop_config(args)))
