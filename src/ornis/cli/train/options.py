"""The options every ``ornis train`` recipe shares: the loop's (``TrainConfig``, defaults read from it) and where
the encoder starts from; and the closing report."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ornis.cli.common import (
    add_output_argument,
    check_writable,
    default_of,
    fraction,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)
from ornis.train.config import OptimDefaults, TrainConfig, TrainResult
from ornis.train.start import POSITIONS


def add_loop_arguments(p: argparse.ArgumentParser, defaults: OptimDefaults | None = None) -> None:
    """The training loop's options, with ``TrainConfig``'s defaults; ``defaults`` are the recipe's optimisation
    defaults that the unset options take (shown in ``--help``)."""
    g = p.add_argument_group(
        "training loop",
        f"unset: the recipe's defaults, {(defaults or OptimDefaults()).describe()} (B: --batch-size)",
    )
    add_output_argument(g, "folder for checkpoints, states files and log.jsonl")
    g.add_argument("--steps", type=positive_int, required=True, help="optimizer steps")
    _add(g, "--batch-size", "batch_size", positive_int, "global batch per step (all GPUs and accumulation)")
    _add(g, "--lr", "lr", positive_float, "peak lr for the global batch")
    _add(g, "--min-lr", "min_lr", non_negative_float)
    _add(g, "--warmup-steps", "warmup_steps", non_negative_int)
    _add(g, "--weight-decay", "weight_decay", non_negative_float)
    _add(g, "--weight-decay-end", "weight_decay_end", non_negative_float, "cosine schedule of the weight decay to this")
    _add(g, "--layer-decay", "layer_decay", positive_float, "layer-wise lr decay, e.g. 0.75")
    g.add_argument("--betas", type=fraction_or_zero, nargs=2, default=None, metavar=("B1", "B2"), help="AdamW betas")
    _add(g, "--grad-clip", "grad_clip", non_negative_float, "max grad norm; 0 turns clipping off")
    g.add_argument(
        "--clip-per-module",
        action=argparse.BooleanOptionalAction,
        default=default_of(TrainConfig, "clip_per_module"),
        help="clip each top-level module (backbone, heads) on its own",
    )
    _add(g, "--grad-accum", "grad_accum", positive_int)
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    _add(g, "--ema-decay", "ema_decay", fraction, "keep and export an EMA of the weights")
    _add(
        g, "--checkpoint-every", "checkpoint_every", non_negative_int, "steps between checkpoints (0: at the end only)"
    )
    _add(g, "--log-every", "log_every", non_negative_int)
    _add(g, "--seed", "seed", non_negative_int)
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=default_of(TrainConfig, "resume"),
        help="continue from the latest states file in --output, or from the states file given",
    )
    _add(g, "--stop-at", "stop_at", positive_int, "stop after this many steps (resume later)")
    g.add_argument(
        "--device",
        default=default_of(TrainConfig, "device"),
        help="default: cuda (LOCAL_RANK) if there is one, else cpu",
    )
    _add(g, "--workers", "num_workers", non_negative_int, "data loader worker processes")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (large ViTs, CUDA only)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument(
        "--grad-checkpointing", action="store_true", help="recompute activations in the backward pass (less memory)"
    )
    e = p.add_argument_group("monitoring")
    e.add_argument(
        "--eval-knn",
        nargs=2,
        metavar=("TRAIN", "VAL"),
        default=default_of(TrainConfig, "eval_knn"),
        help="labelled folders (<class>/<image>): k-NN top-1 (k=20) of the embeddings every --eval-every steps; "
        "dino-v2 and mim keep the best as <tag>_best.pt; a k-NN below 80%% of its best (and 0.05 under it) is "
        "warned about",
    )
    _add(e, "--eval-every", "eval_every", non_negative_int, "steps between evaluations (0: at the end only)")
    e.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=default_of(TrainConfig, "progress"),
        help="a progress line with ETA on stderr (default: when stderr is a terminal)",
    )
    e.add_argument(
        "--tensorboard",
        metavar="DIR",
        default=None,
        help="also write TensorBoard events here (pip install tensorboard)",
    )


def fraction_or_zero(text: str) -> float:
    """argparse type: a number in [0, 1)."""
    return 0.0 if text.strip() in ("0", "0.0") else fraction(text)


def _add(g: argparse._ArgumentGroup, flag: str, field: str, kind: Any, help: str | None = None) -> None:
    default = default_of(TrainConfig, field)
    shown = "the recipe's" if default is None and field in OPTIM_FIELDS else default
    g.add_argument(flag, type=kind, default=default, help=f"{help + ' ' if help else ''}(default: {shown})")


# TrainConfig fields whose unset value is the recipe's default
OPTIM_FIELDS = ("lr", "warmup_steps", "weight_decay", "weight_decay_end", "grad_clip")


def loop_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the parsed options describe; an ``-o`` that cannot be a writable folder is refused here,
    before any work (``check_writable``)."""
    check_writable(args.output, folder=True)
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        output_dir=args.output,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        weight_decay_end=args.weight_decay_end,
        layer_decay=args.layer_decay,
        betas=tuple(args.betas) if args.betas else None,
        grad_clip=args.grad_clip,
        clip_per_module=args.clip_per_module,
        grad_accum=args.grad_accum,
        bf16=args.bf16,
        ema_decay=args.ema_decay,
        checkpoint_every=args.checkpoint_every,
        log_every=args.log_every,
        seed=args.seed,
        resume=args.resume,
        stop_at=args.stop_at,
        device=args.device,
        num_workers=args.workers,
        fsdp=args.fsdp,
        compile=args.compile,
        grad_checkpointing=args.grad_checkpointing,
        eval_knn=tuple(args.eval_knn) if args.eval_knn else None,
        eval_every=args.eval_every,
        progress=args.progress,
        tensorboard=args.tensorboard,
    )


def model_config(text: str) -> dict[str, Any]:
    """argparse type of ``--model-config``: a JSON object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"must be a JSON object of field overrides, got a {type(value).__name__}")
    return value


def add_start_arguments(
    p: argparse.ArgumentParser,
    weights_help: str,
    arch_help: str,
    positions: str | None,
    size: bool = True,
    positions_default: str | None = None,
) -> None:
    """Where the encoder starts: ``--weights`` or ``--arch`` (exactly one), ``--size``, ``--model-config``,
    ``--positions`` (default ``positions``, the recipe's; ``positions_default`` says what it means in ``--help``)."""
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--weights", help=weights_help)
    start.add_argument("--arch", help=arch_help)
    if size:
        p.add_argument("--size", type=positive_int, default=None, help="input size (default: the model's)")
    p.add_argument(
        "--model-config",
        type=model_config,
        default=None,
        help="architecture overrides (from scratch) as JSON, e.g. '{\"drop_path_rate\": 0.1}'",
    )
    p.add_argument(
        "--positions",
        choices=POSITIONS,
        default=positions,
        help="from scratch: start the position embeddings as a 2-D sine-cosine table (MAE's) or as the "
        f"architecture's small random values (default: {positions_default or positions})",
    )


def one_or_many(paths: list[str]) -> str | list[str]:
    """One location as itself, several as a list."""
    return paths[0] if len(paths) == 1 else paths


def report(result: TrainResult, metrics: dict[str, float] | None = None) -> int:
    """Print where the model, the training state and the best model went (and validation numbers); the exit code."""
    if result.checkpoint is not None:
        print(f"model: {result.checkpoint}")
    if result.states is not None:
        print(f"training state: {result.states}")
    if result.best is not None:
        print(f"best model: {result.best}")
    if metrics:
        print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0
