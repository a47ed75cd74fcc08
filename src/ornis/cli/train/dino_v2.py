"""``ornis train dino-v2``: DINOv2 self-distillation (``ornis.train.dino_v2``)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from ornis.cli.common import (
    default_of,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
)
from ornis.cli.train.options import add_start_arguments, loop_config, one_or_many, report
from ornis.train.dino_v2 import DinoV2Config, DinoV2Options, HeadConfig, MultiCropConfig, train_dino_v2
from ornis.train.dino_v2.presets import (
    SMALL_IMAGES_BELOW,
    SMALL_IMAGES_CROPS,
    SMALL_IMAGES_METHOD,
    settings,
    small_images_for,
)
from ornis.train.dino_v2.recipe import DINO_V2_OPTIM

log = logging.getLogger("ornis.train")


def _as_options(chosen: dict[str, Any]) -> str:
    """``{"photometric": False, "global_scale": (0.8, 1.0)}`` -> ``--no-photometric --global-scale 0.8 1.0``."""
    words = []
    for name, value in chosen.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            words.append(flag if value else "--no-" + flag[2:])
        else:
            words.append(" ".join([flag, *map(str, value if isinstance(value, tuple) else (value,))]))
    return " ".join(words)


_SMALL = _as_options({**SMALL_IMAGES_CROPS, **SMALL_IMAGES_METHOD})
HELP = "DINOv2 self-distillation on any images (no labels): ViT, FlexiViT, HieraDet; from scratch or a checkpoint"
OPTIM = DINO_V2_OPTIM
DESCRIPTION = f"""{HELP}.

Defaults are DINOv2's published recipe scaled to the run: teacher temperature 0.04 -> 0.07 over the first 30% of
the steps, the prototype layer frozen (lr 0) for the first epoch, lr {OPTIM.base_lr:g} x sqrt(B/{OPTIM.reference_batch})
with a {OPTIM.warmup_fraction:.0%} warm-up, weight decay {OPTIM.weight_decay:g} -> {OPTIM.weight_decay_end:g} (cosine),
clipping at {OPTIM.grad_clip:g} per module, patch embedding at lr x 0.2, layer decay 0.9 when continuing from
--weights.

Small batches: softmax centring (the default) works at any batch. Sinkhorn-Knopp caps every target probability
near N/K (N teacher rows balanced together, K = --out-dim prototypes), so it is accepted only when
2 x --batch-size + --sinkhorn-queue-size x processes >= --out-dim.

Small images: global crops under {SMALL_IMAGES_BELOW} px (--global-size; DINOv2's views were made for 224 and 96 px)
take crops only at milder scales and a faster, sharper teacher, which made the DINO term learn on 32 px digits where
DINOv2's views did not (the README measures both); --small-images forces it at any size, --no-small-images gives
DINOv2's published views at any size, and an option given by name wins over it:
  {_SMALL}"""

# DinoV2Config fields with an option of the same name (--teacher-temp -> teacher_temp), and their argparse types
METHOD_OPTIONS: dict[str, Any] = {
    "centering": str,
    "sinkhorn_queue_size": non_negative_int,
    "student_temp": positive_float,
    "teacher_temp": positive_float,
    "warmup_teacher_temp": positive_float,
    "warmup_teacher_temp_steps": non_negative_int,
    "momentum_teacher": fraction,
    "dino_weight": non_negative_float,
    "ibot_weight": non_negative_float,
    "koleo_weight": non_negative_float,
    "mask_probability": probability,
    "freeze_last_layer_steps": non_negative_int,
    "patch_embed_lr_scale": non_negative_float,
    "continue_layer_decay": positive_float,
    "collapse_warn_steps": non_negative_int,
}
METHOD_HELP = {
    "centering": "softmax (any batch) or sinkhorn_knopp (needs 2 x batch + queue x processes >= --out-dim)",
    "sinkhorn_queue_size": "earlier teacher outputs (rows per process) joining Sinkhorn-Knopp",
    "warmup_teacher_temp_steps": "default: 30%% of the steps",
    "freeze_last_layer_steps": "steps with the prototype layer at lr 0 (default: one epoch)",
    "continue_layer_decay": "layer-wise lr decay when continuing from --weights (--layer-decay wins)",
    "collapse_warn_steps": "warn when the DINO loss is still ~ln K after these steps (default: temperature warm-up)",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The recipe's own options, with ``DinoV2Config``'s, ``HeadConfig``'s and ``MultiCropConfig``'s defaults."""
    p.add_argument("data", nargs="+", help="any folder of images (no labels, any layout), or .tar shards")
    add_start_arguments(
        p,
        "continue pretraining a published name or a checkpoint file",
        "pretrain this architecture from scratch (ornis models)",
        default_of(DinoV2Options, "positions"),
        size=False,
    )
    g = p.add_argument_group("DINOv2")
    crops = {"global_size": "global crop size", "local_size": "local crop size", "local_crops": "local crops per image"}
    for name, text in crops.items():
        kind = non_negative_int if name == "local_crops" else positive_int
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=default_of(MultiCropConfig, name), help=text)
    for kind in ("global", "local"):
        g.add_argument(
            f"--{kind}-scale",
            type=positive_float,
            nargs=2,
            metavar=("LOW", "HIGH"),
            help=f"area range of the {kind} crops, as shares of the image "
            f"(default: {' '.join(map(str, default_of(MultiCropConfig, f'{kind}_scale')))})",
        )
    g.add_argument(
        "--no-photometric",
        dest="photometric",
        action="store_false",
        default=None,
        help="crops only: no flip, colour jitter, grayscale, blur or solarisation (small or plain images whose two "
        "views must agree for the DINO term to learn, e.g. digits; see the README)",
    )
    g.add_argument(
        "--small-images",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"for small, plain images: {_SMALL} (each overridden by its own option; default: on for --global-size "
        f"under {SMALL_IMAGES_BELOW}; see the README)",
    )
    g.add_argument(
        "--out-dim", type=positive_int, default=default_of(HeadConfig, "out_dim"), help="prototypes of the heads"
    )
    g.add_argument("--head-hidden-dim", type=positive_int, default=default_of(HeadConfig, "hidden_dim"))
    g.add_argument("--head-bottleneck-dim", type=positive_int, default=default_of(HeadConfig, "bottleneck_dim"))
    g.add_argument("--head-layers", type=positive_int, default=default_of(HeadConfig, "num_layers"))
    g.add_argument("--separate-ibot-head", action="store_true", help="score patches with their own head")
    g.add_argument(
        "--head-batch-norm",
        action="store_true",
        help="batch normalisation in the heads' MLP (DINO's use_bn): sharp teacher targets from the first step "
        "when the backbone's embeddings start alike (small, low-variety images)",
    )
    for name, kind in METHOD_OPTIONS.items():
        default = default_of(DinoV2Config, name)
        choices = ["sinkhorn_knopp", "softmax"] if name == "centering" else None
        text = METHOD_HELP.get(name, "")
        if default is not None:
            text = f"{text} (default: {default})".strip()
        if name in SMALL_IMAGES_METHOD:
            default = None  # resolved in options_from_args: the option, else --small-images, else the config's
        g.add_argument("--" + name.replace("_", "-"), type=kind, default=default, choices=choices, help=text or None)
    g.add_argument("--patch-sizes", type=positive_int, nargs="+", help="FlexiViT: patch sizes to draw from per step")


def options_from_args(args: argparse.Namespace) -> DinoV2Options:
    """The ``DinoV2Options`` the parsed options describe."""
    small = small_images_for(args.small_images, args.global_size)
    if small and args.small_images is None:
        log.info(
            "global crops of %d px (under %d): the small-image settings (%s; options given by name win); "
            "--no-small-images for DINOv2's published views",
            args.global_size,
            SMALL_IMAGES_BELOW,
            _SMALL,
        )
    heads = HeadConfig(
        args.out_dim,
        args.head_hidden_dim,
        args.head_bottleneck_dim,
        args.head_layers,
        args.separate_ibot_head,
        args.head_batch_norm,
    )
    method = DinoV2Config(
        heads=heads,
        patch_sizes=tuple(args.patch_sizes) if args.patch_sizes else None,
        **settings({name: getattr(args, name) for name in METHOD_OPTIONS}, SMALL_IMAGES_METHOD, small),
    )
    scales = {name: tuple(v) if (v := getattr(args, name)) else None for name in ("global_scale", "local_scale")}
    crops = MultiCropConfig(
        args.global_size,
        args.local_size,
        args.local_crops,
        **settings({**scales, "photometric": args.photometric}, SMALL_IMAGES_CROPS, small),
    )
    return DinoV2Options(
        data=one_or_many(args.data),
        weights=args.weights,
        arch=args.arch,
        model_config=args.model_config,
        positions=args.positions,
        method=method,
        crops=crops,
    )


def run(args: argparse.Namespace) -> int:
    """Pretrain, then report the files."""
    return report(train_dino_v2(options_from_args(args), loop_config(args)))
