"""``ornis train <recipe>``: the training recipes. Every recipe shares the loop's options (steps, batch, lr
schedule, bf16, EMA, checkpoints, resume) and adds its own.

A recipe is an entry of ``RECIPES``: an object (or the dotted name of a module) with ``add_arguments(parser)`` and
``run(args) -> exit code``. Adding one is one line here. Run under ``torchrun --nproc-per-node N`` for DDP.
"""

from __future__ import annotations

import argparse
import importlib
import json
from typing import Any

from ornis.train.loop import TrainConfig


def add_loop_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training loop")
    g.add_argument("--output", "-o", required=True, help="folder for checkpoints, states files and log.jsonl")
    g.add_argument("--steps", type=int, required=True, help="optimizer steps")
    g.add_argument("--batch-size", type=int, default=256, help="global batch per step (all GPUs and accumulation)")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--min-lr", type=float, default=1e-6)
    g.add_argument("--warmup-steps", type=int, default=0)
    g.add_argument("--weight-decay", type=float, default=0.05)
    g.add_argument("--layer-decay", type=float, default=None, help="layer-wise lr decay, e.g. 0.75")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm; 0 turns clipping off")
    g.add_argument("--grad-accum", type=int, default=1)
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    g.add_argument("--ema-decay", type=float, default=None, help="keep and export an EMA of the weights")
    g.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end only)")
    g.add_argument("--log-every", type=int, default=10)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", nargs="?", const=True, default=False,
                   help="continue from the latest states file in --output, or from the states file given")
    g.add_argument("--stop-at", type=int, default=None, help="stop after this many steps (resume later)")
    g.add_argument("--device", default=None, help="default: cuda (LOCAL_RANK) if there is one, else cpu")
    g.add_argument("--workers", type=int, default=4, help="data loader worker processes")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (large ViTs, CUDA only)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")


def loop_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        steps=args.steps, batch_size=args.batch_size, output_dir=args.output, lr=args.lr, min_lr=args.min_lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, layer_decay=args.layer_decay,
        grad_clip=args.grad_clip or None, grad_accum=args.grad_accum, bf16=args.bf16, ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every, log_every=args.log_every, seed=args.seed, resume=args.resume,
        stop_at=args.stop_at, device=args.device, num_workers=args.workers, fsdp=args.fsdp, compile=args.compile,
    )


def _model_arguments(p: argparse.ArgumentParser) -> None:
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--weights", help="start from a published name or a checkpoint file")
    start.add_argument("--arch", help="start from scratch with this architecture (ornis models)")
    p.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument("--model-config", type=json.loads, default=None, help='architecture overrides as JSON, e.g. \'{"drop_path_rate": 0.1}\'')


class Classify:
    help = "supervised classification: fine-tune a checkpoint on new classes or train from scratch"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("train", nargs="+", help="a folder of <class>/<image>, or webdataset .tar shards (.cls labels)")
        p.add_argument("--val", default=None, help="validation folder (same class names) for top-1 / top-5")
        _model_arguments(p)
        p.add_argument("--aug", choices=["randaugment", "trivialaugment", "none"], default="randaugment")
        p.add_argument("--crop-scale", type=float, nargs=2, default=(0.08, 1.0), metavar=("MIN", "MAX"))
        p.add_argument("--mixup", type=float, default=0.0, help="mixup alpha (0: off)")
        p.add_argument("--cutmix", type=float, default=0.0, help="cutmix alpha (0: off)")
        p.add_argument("--label-smoothing", type=float, default=0.1)

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from ornis.train.supervised import ClassifyOptions, train_classifier

        opts = ClassifyOptions(
            train=_one_or_many(args.train), val=args.val, weights=args.weights, arch=args.arch, size=args.size,
            model_config=args.model_config, auto_augment=None if args.aug == "none" else args.aug,
            crop_scale=tuple(args.crop_scale), mixup_alpha=args.mixup, cutmix_alpha=args.cutmix,
            label_smoothing=args.label_smoothing,
        )
        result, metrics = train_classifier(opts, loop_config(args))
        _report(result, metrics)
        return 0


class MaskedImageModelling:
    help = "MAE-style masked image modelling on any images (no labels needed)"

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("train", nargs="+", help="any folder of images, or webdataset .tar shards")
        _model_arguments(p)
        p.add_argument("--mask-ratio", type=float, default=None, help="default: 0.75 for ViT, 0.6 for Hiera")
        p.add_argument("--mask-unit", type=int, default=None, help="mask unit side in patch tokens (default: the model's)")
        p.add_argument("--decoder-dim", type=int, default=256)
        p.add_argument("--decoder-depth", type=int, default=4)
        p.add_argument("--decoder-heads", type=int, default=8)
        p.add_argument("--no-norm-pix", action="store_true", help="predict raw pixels instead of per-patch normalised ones")
        p.add_argument("--crop-scale", type=float, nargs=2, default=(0.2, 1.0), metavar=("MIN", "MAX"))

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from ornis.train.mim import MIMOptions, train_mim

        opts = MIMOptions(
            train=_one_or_many(args.train), weights=args.weights, arch=args.arch, size=args.size,
            model_config=args.model_config, mask_ratio=args.mask_ratio, mask_unit=args.mask_unit,
            decoder_dim=args.decoder_dim, decoder_depth=args.decoder_depth, decoder_heads=args.decoder_heads,
            norm_pix=not args.no_norm_pix, crop_scale=tuple(args.crop_scale),
        )
        _report(train_mim(opts, loop_config(args)), None)
        return 0


DESCRIPTION = """Train or fine-tune an encoder with one of the recipes below. Every recipe writes checkpoints in the
published format (ornis.load_pretrained_model(path) and `ornis embed` read them) plus a *_states.pt file to resume
from (--resume). For several GPUs: torchrun --nproc-per-node N $(which ornis) train RECIPE ..."""

# recipe name -> an object or the dotted name of a module with add_arguments(parser) and run(args)
RECIPES: dict[str, Any] = {
    "classify": Classify,
    "mim": MaskedImageModelling,
    "dino-v2": "ornis.train.dino_v2.cli",
}


def _one_or_many(paths: list[str]) -> str | list[str]:
    return paths[0] if len(paths) == 1 else paths


def _report(result: Any, metrics: dict[str, float] | None) -> None:
    if result.checkpoint is not None:
        print(f"model: {result.checkpoint}")
    if result.states is not None:
        print(f"training state: {result.states}")
    if metrics:
        print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train or fine-tune encoders (classify, mim, ...)",
                                   description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    recipes = parser.add_subparsers(dest="recipe", metavar="RECIPE")
    for name, recipe in RECIPES.items():
        impl = importlib.import_module(recipe) if isinstance(recipe, str) else recipe
        p = recipes.add_parser(name, help=getattr(impl, "help", None), description=getattr(impl, "help", None))
        impl.add_arguments(p)
        add_loop_arguments(p)
        p.set_defaults(func=_finishing(impl.run))
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _finishing(run: Any) -> Any:
    def call(args: argparse.Namespace) -> int:
        from ornis.train.loop import cleanup_distributed

        try:
            return run(args)
        finally:
            cleanup_distributed()

    return call
