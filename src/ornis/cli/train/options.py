"""The options every ``ornis train`` recipe shares: the loop's (``TrainConfig``, defaults read from it) and where
the encoder starts from; and the closing report."""

from __future__ import annotations

import argparse
import json

from ornis.cli.common import add_output_argument, default_of
from ornis.train.config import TrainConfig, TrainResult


def add_loop_arguments(p: argparse.ArgumentParser) -> None:
    """The training loop's options, with ``TrainConfig``'s defaults."""
    g = p.add_argument_group("training loop")
    add_output_argument(g, "folder for checkpoints, states files and log.jsonl")
    g.add_argument("--steps", type=int, required=True, help="optimizer steps")
    _add(g, "--batch-size", "batch_size", int, "global batch per step (all GPUs and accumulation)")
    _add(g, "--lr", "lr", float)
    _add(g, "--min-lr", "min_lr", float)
    _add(g, "--warmup-steps", "warmup_steps", int)
    _add(g, "--weight-decay", "weight_decay", float)
    _add(g, "--layer-decay", "layer_decay", float, "layer-wise lr decay, e.g. 0.75")
    _add(g, "--grad-clip", "grad_clip", float, "max grad norm; 0 turns clipping off")
    _add(g, "--grad-accum", "grad_accum", int)
    g.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    _add(g, "--ema-decay", "ema_decay", float, "keep and export an EMA of the weights")
    _add(g, "--checkpoint-every", "checkpoint_every", int, "steps between checkpoints (0: at the end only)")
    _add(g, "--log-every", "log_every", int)
    _add(g, "--seed", "seed", int)
    g.add_argument(
        "--resume",
        nargs="?",
        const=True,
        default=default_of(TrainConfig, "resume"),
        help="continue from the latest states file in --output, or from the states file given",
    )
    _add(g, "--stop-at", "stop_at", int, "stop after this many steps (resume later)")
    g.add_argument(
        "--device",
        default=default_of(TrainConfig, "device"),
        help="default: cuda (LOCAL_RANK) if there is one, else cpu",
    )
    _add(g, "--workers", "num_workers", int, "data loader worker processes")
    g.add_argument("--fsdp", action="store_true", help="shard the model with FSDP (large ViTs, CUDA only)")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")


def _add(g: argparse._ArgumentGroup, flag: str, field: str, kind: type, help: str | None = None) -> None:
    default = default_of(TrainConfig, field)
    g.add_argument(flag, type=kind, default=default, help=f"{help + ' ' if help else ''}(default: {default})")


def loop_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` the parsed options describe."""
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        output_dir=args.output,
        lr=args.lr,
        min_lr=args.min_lr,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        layer_decay=args.layer_decay,
        grad_clip=args.grad_clip or None,
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
    )


def add_start_arguments(p: argparse.ArgumentParser, weights_help: str, arch_help: str, size: bool = True) -> None:
    """Where the encoder starts: ``--weights`` or ``--arch`` (exactly one), ``--size``, ``--model-config``."""
    start = p.add_mutually_exclusive_group(required=True)
    start.add_argument("--weights", help=weights_help)
    start.add_argument("--arch", help=arch_help)
    if size:
        p.add_argument("--size", type=int, default=None, help="input size (default: the model's)")
    p.add_argument(
        "--model-config",
        type=json.loads,
        default=None,
        help="architecture overrides (from scratch) as JSON, e.g. '{\"drop_path_rate\": 0.1}'",
    )


def one_or_many(paths: list[str]) -> str | list[str]:
    """One location as itself, several as a list."""
    return paths[0] if len(paths) == 1 else paths


def report(result: TrainResult, metrics: dict[str, float] | None = None) -> int:
    """Print where the model and the training state went (and validation numbers); the exit code."""
    if result.checkpoint is not None:
        print(f"model: {result.checkpoint}")
    if result.states is not None:
        print(f"training state: {result.states}")
    if metrics:
        print(" ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return 0
