"""``ornis convert``: upstream releases (SAM 2, DINOv2) -> checkpoints in the published format."""

from __future__ import annotations

import argparse

from ornis.weights.checkpoint import read_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("convert", help="convert upstream checkpoints (SAM 2, DINOv2) to ornis files")
    kinds = parser.add_subparsers(dest="source", metavar="SOURCE", required=True)

    sam2 = kinds.add_parser(
        "sam2", help="SAM 2 / 2.1 checkpoint (sam2.1_hiera_*.pt) -> hieradet_* (image-encoder trunk)"
    )
    sam2.add_argument("src", help="the SAM 2 .pt file")
    sam2.add_argument("-o", "--output", required=True, help="the .pt or .safetensors file to write")
    sam2.add_argument("--network", help="hieradet variant (default: the one matching the trunk's depths and width)")
    sam2.add_argument("--size", type=int, default=1024, help="input size recorded in the file (default: 1024, SAM 2's)")
    sam2.set_defaults(func=run_sam2)

    dinov2 = kinds.add_parser(
        "dinov2", help="DINOv2 with registers (torch-hub .pth or Hugging Face folder) -> vit_reg*_nps_ls"
    )
    dinov2.add_argument("src", help="torch-hub state dict (.pth / .safetensors) or a Hugging Face model folder")
    dinov2.add_argument("-o", "--output", required=True, help="the .pt or .safetensors file to write")
    dinov2.add_argument("--num-heads", type=int, help="attention heads (torch-hub files only; default: width / 64)")
    dinov2.set_defaults(func=run_dinov2)


def _report(path) -> int:
    ckpt = read_checkpoint(path)
    size = ckpt.size
    print(f"wrote {path} ({ckpt.network}, {size[0]}x{size[1]}, {len(ckpt.state)} tensors)")
    return 0


def run_sam2(args: argparse.Namespace) -> int:
    from ornis.weights.convert import convert_sam2

    return _report(convert_sam2(args.src, args.output, network=args.network, size=args.size))


def run_dinov2(args: argparse.Namespace) -> int:
    from ornis.weights.convert import convert_dinov2

    return _report(convert_dinov2(args.src, args.output, num_heads=args.num_heads))
