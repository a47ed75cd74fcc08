"""Do the training recipes learn? One command, JSON out: each recipe trains on a small labelled set of real images
that ships in a PyPI package (scikit-learn's handwritten digits: 1,797 8x8 scans upscaled to 32 px; 1,400 to train,
397 held out; labels unused by the self-supervised recipes) and reports the k-NN top-1 (k = 20, T = 0.07) of the
held-out embeddings against the same encoder at random init, with the steps and the wall time.

The DINOv2 protocol (issue 14): ``vit_t16`` with patch 4 at 32 px, batch 32, 4 local crops of 16 px, head 512 hidden
/ 1,024 prototypes, 430 steps, ornis's defaults for everything else: the crops being under 96 px, these include
the small-image settings of ``ornis.train.dino_v2.presets`` (``--no-small-images``: DINOv2's published views). Birder
0.8.4's reference recipe reaches 0.569 on it; random init 0.461.

    python benchmarks/train_quality.py --recipes dino-v2 -o benchmarks/results/train_quality_cpu.json

Recipes: ``dino-v2`` (vit_t16), ``dino-v2-flexivit`` (patch 4 or 8 drawn per step), ``dino-v2-hieradet``
(hieradet_d_tiny), ``mim`` (MAE on vit_t16), ``mim-hiera`` (hiera_tiny at 128 px), ``classify`` (fine-tunes
``--weights`` or the DINOv2 run's encoder; validation top-1 on the held-out digits), e.g.

    python benchmarks/train_quality.py --recipes classify --weights run/vit_t16_dino-v2.pt --lr 1e-3 --layer-decay 0.65
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import ornis
from ornis.train.config import TrainConfig
from ornis.train.dino_v2 import DinoV2Config, DinoV2Options, HeadConfig, MultiCropConfig, train_dino_v2
from ornis.train.dino_v2.presets import SMALL_IMAGES_CROPS, SMALL_IMAGES_METHOD, settings, small_images_for
from ornis.train.evaluation import KnnMonitor
from ornis.train.mim import MIMOptions, mim_positions, train_mim
from ornis.train.start import POSITIONS, start_encoder
from ornis.train.supervised import ClassifyOptions, train_classifier

SIZE = 32
VIT = {"patch_size": 4}


def write_digits(root: Path, train_count: int = 1400, seed: int = 0) -> tuple[Path, Path]:
    """scikit-learn's digits as ``root/{train,val}/<digit>/<i>.png`` (RGB, 32 px, bicubic from 8 px)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(seed).permutation(len(digits.images))
    for rank, i in enumerate(order):
        split = "train" if rank < train_count else "val"
        folder = root / split / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
        image = Image.fromarray(pixels).resize((SIZE, SIZE), Image.BICUBIC).convert("RGB")
        image.save(folder / f"{i:04d}.png")
    return root / "train", root / "val"


def knn_of(encoder: torch.nn.Module, train: Path, val: Path, size: int) -> float:
    """k-NN top-1 of ``encoder``'s embeddings at ``size`` px, val voted by train."""
    return KnnMonitor(train, val, (size, size))(encoder, torch.device("cpu"))["knn_top1"]


def curve_of(logs: list[dict[str, Any]], keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """The logged steps that carry a k-NN figure, with ``keys``."""
    return [{k: e[k] for k in ("step", "knn_top1", *keys) if k in e} for e in logs if "knn_top1" in e]


def loop(args: argparse.Namespace, out: Path, train: Path, val: Path) -> TrainConfig:
    """The loop settings every recipe shares here (the recipe's own optimisation defaults)."""
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        output_dir=out,
        log_every=args.log_every,
        eval_knn=(train, val),
        eval_every=args.eval_every,
        num_workers=args.workers,
        progress=False,
        seed=args.seed,
        lr=args.lr,
        layer_decay=args.layer_decay,
    )


# The DINOv2 protocol's backbones: (architecture, overrides, global and local crop size). FlexiViT draws its patch
# size per step from those in its range that tile both crop sizes (4 and 8 here). HieraDet takes multiples of 32 px,
# so its crops are 64 and 32 px (the digits upscaled twice as much).
DINO_ARCHS = {
    "dino-v2": ("vit_t16", VIT, SIZE, 16),
    "dino-v2-flexivit": ("flexivit_t16", {"patch_size": 4, "min_patch_size": 4, "max_patch_size": 8}, SIZE, 16),
    "dino-v2-hieradet": ("hieradet_d_tiny", {}, 64, 32),
}


def chosen_positions(args: argparse.Namespace) -> dict[str, str]:
    """``--positions`` as an option override; none when not given (each recipe's own default)."""
    return {"positions": args.positions} if args.positions else {}


def started_from(args: argparse.Namespace) -> dict[str, str]:
    """``--start`` (a checkpoint to continue pretraining), else ``chosen_positions``."""
    return {"weights": args.start, "arch": None, "model_config": None} if args.start else chosen_positions(args)


def self_supervised(
    args: argparse.Namespace,
    opts: DinoV2Options | MIMOptions,
    model: tuple[str, dict[str, Any], int],
    data: tuple[Path, Path],
    fit: Any,
) -> tuple[dict[str, Any], Any]:
    """What DINOv2 and MIM report alike: the k-NN of ``model`` (architecture, overrides, size) at random init
    (seeded) as the recipe starts it from scratch (``opts.positions``), and next to it either the ``--start``
    checkpoint's k-NN (``opts.weights``) or, for sine-cosine positions, the architecture's own init's; then ``fit()``
    timed, its k-NN curve and the last figure. Returns the report's shared fields and the training result."""
    arch, config, size = model
    positions = opts.positions or mim_positions(arch)  # MIM's None: the family's
    torch.manual_seed(args.seed)
    random_init = knn_of(start_encoder(None, arch, size, config, positions=positions).encoder, *data, size)
    extra = {}
    if opts.weights is not None:  # --start: the checkpoint's own figure, next to the architecture's random init
        started = start_encoder(opts.weights, None, None, None).encoder
        extra["start"], extra["knn_start"] = str(opts.weights), knn_of(started, *data, size)
    elif positions != "random":
        torch.manual_seed(args.seed)
        plain = ornis.build_model(arch, size=size, config=config)
        extra["knn_random_init_random_positions"] = knn_of(plain, *data, size)
    t0 = time.perf_counter()
    result = fit()
    wall = time.perf_counter() - t0
    keys = ("loss", "dino", "ibot", "koleo", "target_entropy", "target_max", "agreement", "view_correlation")
    curve = curve_of(result.logs, keys)
    shared = {
        "seed": args.seed,
        "lr": args.lr,
        "positions": positions,
        "knn_random_init": random_init,
        **extra,
        "knn_trained": curve[-1]["knn_top1"],
        "steps": args.steps,
        "wall_s": wall,
        "images_per_s": args.steps * args.batch_size / wall,
        "curve": curve,
    }
    return shared, result


# DinoV2Config fields the benchmark can override (default: the recipe's)
DINO_OVERRIDES = {
    "student_temp": "student temperature (default 0.1)",
    "teacher_temp": "teacher temperature after the warm-up (default 0.07)",
    "warmup_teacher_temp": "teacher temperature at step 0 (default 0.04)",
    "momentum_teacher": "teacher EMA momentum at step 0 (default 0.992)",
}


def run_dino(args: argparse.Namespace, work: Path, train: Path, val: Path, recipe: str) -> dict[str, Any]:
    """DINOv2 on the protocol of the module docstring, with ``recipe``'s backbone (``DINO_ARCHS``)."""
    arch, config, size, local = DINO_ARCHS[recipe]
    # as ornis train dino-v2: --small-images on by default for crops this small; options given by name win
    small = small_images_for(args.small_images, size)
    overrides = settings({k: getattr(args, k) for k in DINO_OVERRIDES}, SMALL_IMAGES_METHOD, small)
    heads = HeadConfig(out_dim=1024, hidden_dim=512, batch_norm=args.head_batch_norm)
    method = DinoV2Config(heads=heads, **overrides)
    given = {k: tuple(v) if (v := getattr(args, k)) else None for k in ("global_scale", "local_scale")}
    chosen = settings({**given, "photometric": args.photometric}, SMALL_IMAGES_CROPS, small)
    crops = MultiCropConfig(size, local, 4, **chosen)
    opts = DinoV2Options(
        **{"data": train, "arch": arch, "model_config": config, "method": method, "crops": crops, **started_from(args)}
    )
    shared, result = self_supervised(
        args,
        opts,
        (arch, config, size),
        (train, val),
        lambda: train_dino_v2(opts, loop(args, work / recipe, train, val)),
    )
    protocol = f"{arch} {config}, batch {args.batch_size}, 2 global crops of {size} px + 4 local of {local} px"
    scales = {k: v for k, v in chosen.items() if k != "photometric"}
    changed = "".join(f", {k} {v}" for k, v in {**overrides, **scales}.items())
    changed += ", batch norm in the head" if args.head_batch_norm else ""
    changed += "" if crops.photometric else ", crops only (no photometric augmentations)"
    protocol += ", head 512 / 1024" + changed
    return {"protocol": protocol, "small_images": small, **shared, "checkpoint": str(result.checkpoint)}


# MIM's encoders: (architecture, size, overrides). Hiera masks 32 x 32 px units, so it trains at 128 px (4 x 4 units)
MIM_ARCHS = {
    "mim": ("vit_t16", SIZE, VIT),
    "mim-hiera": ("hiera_tiny", 128, {}),
}


def run_mim(args: argparse.Namespace, work: Path, train: Path, val: Path, recipe: str) -> dict[str, Any]:
    """MAE / Hiera-MAE with the recipe's defaults (or ``--lr``); k-NN at the encoder's training size."""
    arch, size, config = MIM_ARCHS[recipe]
    opts = MIMOptions(
        **{
            "train": train,
            "arch": arch,
            "size": size,
            "model_config": config,
            "norm_pix": args.norm_pix,
            **started_from(args),
        }
    )
    shared, _ = self_supervised(
        args, opts, (arch, config, size), (train, val), lambda: train_mim(opts, loop(args, work / recipe, train, val))
    )
    targets = "per-patch normalised pixels" if args.norm_pix else "raw pixels (--no-norm-pix)"
    return {"protocol": f"{arch} {config} at {size} px, batch {args.batch_size}, MAE's recipe, {targets}", **shared}


def run_classify(args: argparse.Namespace, work: Path, train: Path, val: Path, weights: str | None) -> dict[str, Any]:
    """Supervised fine-tuning of ``weights`` (the DINOv2 result when it ran) or from scratch, top-1 on val."""
    opts = ClassifyOptions(
        train=train,
        val=val,
        weights=weights,
        arch=None if weights else args.arch,
        size=args.size,
        model_config=None if weights else VIT if args.arch == "vit_t16" else {},
        **chosen_positions(args),
        auto_augment=args.auto_augment,
        crop_scale=(args.crop_min, 1.0),
        hflip=args.hflip,
    )
    low, high = opts.crop_scale
    model = "" if weights else f"{args.arch} patch 4 " if args.arch == "vit_t16" else f"{args.arch} "
    t0 = time.perf_counter()
    result, metrics = train_classifier(opts, loop(args, work / "classify", train, val))
    wall = time.perf_counter() - t0
    return {
        "protocol": f"{model}at {args.size} px, batch {args.batch_size}, "
        + f"crops {low:g}-{high:g}, "
        + ("flips, " if args.hflip else "no flips, ")
        + (f"{opts.auto_augment}, " if opts.auto_augment else "")
        + (f"fine-tuned from {weights}" if weights else "from scratch"),
        "lr": args.lr,
        "layer_decay": args.layer_decay,
        "top1": metrics["top1"] if metrics else None,
        "top5": metrics["top5"] if metrics else None,
        "steps": args.steps,
        "wall_s": wall,
        "curve": curve_of(result.logs, ("val_top1", "loss")),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipes", nargs="+", default=["dino-v2", "mim", "classify"])
    p.add_argument("--steps", type=int, default=430)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--eval-every", type=int, default=43)
    p.add_argument("--log-every", type=int, default=43)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay (fine-tuning: MAE's 0.65)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: each recipe's, scaled)")
    p.add_argument("--weights", default=None, help="checkpoint to fine-tune (default: the DINOv2 run's)")
    p.add_argument(
        "--start",
        default=None,
        help="dino-v2, mim: continue pretraining this checkpoint (the k-NN of "
        "the architecture's random init is still reported, the checkpoint's as knn_start)",
    )
    p.add_argument("--no-hflip", dest="hflip", action="store_false", help="classify: no horizontal flips")
    p.add_argument("--auto-augment", default=None, help="classify: e.g. randaugment (default: none)")
    p.add_argument("--arch", default="vit_t16", help="classify from scratch (no --weights and no DINOv2 run)")
    p.add_argument("--size", type=int, default=SIZE, help="classify: input size (HieraDet: a multiple of 32)")
    p.add_argument("--crop-min", type=float, default=0.6, help="classify: smallest random-resized-crop area")
    for name, text in DINO_OVERRIDES.items():
        p.add_argument("--" + name.replace("_", "-"), type=float, default=None, help=f"dino-v2: {text}")
    p.add_argument(
        "--no-photometric", dest="photometric", action="store_false", default=None, help="dino-v2: crops only"
    )
    p.add_argument(
        "--small-images",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="dino-v2: as ornis train dino-v2 (default: on, the crops being under 96 px; off: DINOv2's views)",
    )
    p.add_argument("--head-batch-norm", action="store_true", help="dino-v2: batch normalisation in the head's MLP")
    p.add_argument("--global-scale", type=float, nargs=2, help="dino-v2: global crops' area range (default 0.32 1)")
    p.add_argument("--local-scale", type=float, nargs=2, help="dino-v2: local crops' area range (default 0.05 0.32)")
    p.add_argument("--positions", choices=POSITIONS, help="from scratch (default: each recipe's)")
    p.add_argument("--no-norm-pix", dest="norm_pix", action="store_false", help="mim: raw pixel targets")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--work", default=None, help="folder for the data and runs (default: a temporary one)")
    p.add_argument("-o", "--output", default="benchmarks/results/train_quality_cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(args.work or tempfile.mkdtemp(prefix="ornis_quality_"))
    train, val = write_digits(work / "digits")
    report: dict[str, Any] = {
        "data": "scikit-learn digits, 1400 train / 397 held out, 8 px upscaled to 32 px (bicubic)",
        "metric": "k-NN top-1 (k=20, T=0.07) of held-out embeddings voted by the training embeddings",
        "torch": torch.__version__,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "results": {},
    }
    out = Path(args.output)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1) + "\n")

    weights = args.weights
    for recipe in args.recipes:
        if recipe in DINO_ARCHS:
            report["results"][recipe] = r = run_dino(args, work, train, val, recipe)
            weights = weights or r["checkpoint"]
        elif recipe in MIM_ARCHS:
            report["results"][recipe] = run_mim(args, work, train, val, recipe)
        elif recipe == "classify":
            report["results"]["classify"] = run_classify(args, work, train, val, weights)
        save()
        print(json.dumps({recipe: {k: v for k, v in report["results"][recipe].items() if k != "curve"}}))


if __name__ == "__main__":
    main()
