"""``ornis train dino-v2``: the recipe's own arguments and the call into ``train_dino_v2`` (``ornis.cli.train``
adds the loop's arguments and runs ``run``)."""

from __future__ import annotations

import argparse
import json
from dataclasses import fields

from ornis.train.dino_v2.meta_arch import HeadConfig
from ornis.train.dino_v2.multicrop import MultiCropConfig
from ornis.train.dino_v2.recipe import DinoV2Config, DinoV2Options, train_dino_v2

help = "DINOv2 self-distillation on any images (no labels): ViT, FlexiViT, HieraDet; from scratch or a checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``dino-v2`` sub-command's own arguments (``ornis.cli.train`` adds the loop's)."""
    d, h, c = DinoV2Config(), HeadConfig(), MultiCropConfig()
    parser.add_argument("data", nargs="+", help="any folder of images (no labels, any layout), or .tar shards")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--weights", help="continue pretraining a published name or a checkpoint file")
    start.add_argument("--arch", help="pretrain this architecture from scratch (ornis models)")
    parser.add_argument(
        "--model-config",
        type=json.loads,
        default=None,
        help="architecture overrides (from scratch) as JSON, e.g. '{\"drop_path_rate\": 0.1}'",
    )
    g = parser.add_argument_group("DINOv2")
    g.add_argument("--global-size", type=int, default=c.global_size, help="global crop size")
    g.add_argument("--local-size", type=int, default=c.local_size, help="local crop size")
    g.add_argument("--local-crops", type=int, default=c.local_crops, help="local crops per image")
    g.add_argument("--out-dim", type=int, default=h.out_dim, help="prototypes of the DINO / iBOT head")
    g.add_argument("--head-hidden-dim", type=int, default=h.hidden_dim)
    g.add_argument("--head-bottleneck-dim", type=int, default=h.bottleneck_dim)
    g.add_argument("--head-layers", type=int, default=h.num_layers)
    g.add_argument("--separate-ibot-head", action="store_true", help="score patches with their own head")
    g.add_argument("--centering", choices=["sinkhorn_knopp", "softmax"], default=d.centering)
    g.add_argument(
        "--sinkhorn-queue-size",
        type=int,
        default=d.sinkhorn_queue_size,
        help="earlier teacher outputs (rows per process) joining Sinkhorn-Knopp; helps small batches",
    )
    g.add_argument("--teacher-temp", type=float, default=d.teacher_temp)
    g.add_argument("--warmup-teacher-temp", type=float, default=d.warmup_teacher_temp)
    g.add_argument("--warmup-teacher-temp-steps", type=int, default=d.warmup_teacher_temp_steps)
    g.add_argument("--momentum-teacher", type=float, default=d.momentum_teacher)
    g.add_argument("--dino-weight", type=float, default=d.dino_weight)
    g.add_argument("--ibot-weight", type=float, default=d.ibot_weight)
    g.add_argument("--koleo-weight", type=float, default=d.koleo_weight)
    g.add_argument("--mask-probability", type=float, default=d.mask_probability)
    g.add_argument("--freeze-last-layer-steps", type=int, default=d.freeze_last_layer_steps)
    g.add_argument("--patch-sizes", type=int, nargs="+", help="FlexiViT: patch sizes to draw from per step")


def options_from_args(args: argparse.Namespace) -> DinoV2Options:
    heads = HeadConfig(
        args.out_dim, args.head_hidden_dim, args.head_bottleneck_dim, args.head_layers, args.separate_ibot_head
    )
    names = {f.name for f in fields(DinoV2Config)} - {"heads", "patch_sizes"}
    method = DinoV2Config(
        heads=heads,
        patch_sizes=tuple(args.patch_sizes) if args.patch_sizes else None,
        **{k: getattr(args, k) for k in names if hasattr(args, k)},
    )
    crops = MultiCropConfig(args.global_size, args.local_size, args.local_crops)
    data = args.data[0] if len(args.data) == 1 else args.data
    return DinoV2Options(
        data=data, weights=args.weights, arch=args.arch, model_config=args.model_config, method=method, crops=crops
    )


def run(args: argparse.Namespace) -> int:
    from ornis.cli.train import loop_config

    result = train_dino_v2(options_from_args(args), loop_config(args))
    if result.checkpoint is not None:
        print(f"model: {result.checkpoint}")
    if result.states is not None:
        print(f"training state: {result.states}")
    return 0
