"""``ornis convert``: upstream releases (SAM 2, DINOv2) -> checkpoints in the published format."""

from __future__ import annotations

import argparse
from pathlib import Path

from ornis.cli.common import add_output_argument, positive_int
from ornis.weights.checkpoint import read_checkpoint
from ornis.weights.convert import convert_dinov2, convert_sam2
from ornis.weights.convert.sam2 import SAM2_SIZE


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``convert`` command and its ``sam2`` / ``dinov2`` sources."""
    parser = subparsers.add_parser("convert", help="convert upstream checkpoints (SAM 2, DINOv2) to ornis files")
    kinds = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)

    sam2 = kinds.add_parser(
        "sam2", help="SAM 2 / 2.1 checkpoint (sam2.1_hiera_*.pt) -> hieradet_* (image-encoder trunk)"
    )
    sam2.add_argument("src", help="the SAM 2 .pt file")
    add_output_argument(sam2, "the .pt or .safetensors file to write")
    sam2.add_argument("--network", help="hieradet variant (default: the one matching the trunk's depths and width)")
    sam2.add_argument(
        "--size",
        type=positive_int,
        default=SAM2_SIZE,
        help=f"input size recorded in the file (default: {SAM2_SIZE}, SAM 2's)",
    )
    sam2.set_defaults(func=run_sam2)

    dinov2 = kinds.add_parser(
        "dinov2", help="DINOv2 with registers (torch-hub .pth or Hugging Face folder) -> vit_reg*_nps_ls"
    )
    dinov2.add_argument("src", help="torch-hub state dict (.pth / .safetensors) or a Hugging Face model folder")
    add_output_argument(dinov2, "the .pt or .safetensors file to write")
    dinov2.add_argument(
        "--num-heads", type=positive_int, help="attention heads (torch-hub files only; default: width / 64)"
    )
    dinov2.set_defaults(func=run_dinov2)


def _report(path: Path) -> int:
    ckpt = read_checkpoint(path)
    size = ckpt.size
    print(f"wrote {path} ({ckpt.network}, {size[0]}x{size[1]}, {len(ckpt.state)} tensors)")
    return 0


def run_sam2(args: argparse.Namespace) -> int:
    """Convert a SAM 2 checkpoint's trunk."""
    return _report(convert_sam2(args.src, args.output, network=args.network, size=args.size))


def run_dinov2(args: argparse.Namespace) -> int:
    """Convert a DINOv2-with-registers checkpoint."""
    return _report(convert_dinov2(args.src, args.output, num_heads=args.num_heads))
