"""``ornis export``: a model as TorchScript (.pts), a torch.export program (.pt2) or ONNX, checked against eager."""

from __future__ import annotations

import argparse

from ornis.cli.common import add_output_argument, non_negative_float, positive_int
from ornis.export import (
    DEFAULT_CHECK_BATCH,
    DEFAULT_OUTPUT,
    DEFAULT_TOLERANCE,
    FORMATS,
    OUTPUTS,
    check_destination,
    export_model,
    resolve_format,
)
from ornis.loading import load_pretrained_model


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` command."""
    parser = subparsers.add_parser(
        "export",
        help="export a model to TorchScript, torch.export (.pt2) or ONNX, checked against the eager model",
        description=(
            "Export MODEL (a published name or a checkpoint path). The batch size is always dynamic; the input size "
            "is fixed unless --dynamic-size (pt2 and onnx, ViT / FlexiViT). The written file is run beside the eager "
            "model on random batches; if they differ beyond --tolerance the file is deleted and the exit code is 1."
        ),
    )
    parser.add_argument("model", metavar="MODEL", help="published weights name or checkpoint path")
    add_output_argument(parser, "where to write the export", metavar="FILE", aliases=("--output-file",))
    parser.add_argument("--format", choices=FORMATS, help="default: from the suffix of FILE")
    parser.add_argument(
        "--returns",
        default=DEFAULT_OUTPUT,
        choices=OUTPUTS,
        help=f"what the graph returns (default: {DEFAULT_OUTPUT})",
    )
    parser.add_argument(
        "--size", type=positive_int, nargs=2, metavar=("H", "W"), help="input size (default: the model's)"
    )
    parser.add_argument("--dynamic-size", action="store_true", help="accept any input size (pt2, onnx; ViT family)")
    parser.add_argument("--patch-size", type=positive_int, help="FlexiViT: the patch size baked into the export")
    parser.add_argument(
        "--batch",
        type=positive_int,
        default=DEFAULT_CHECK_BATCH,
        metavar="N",
        help=f"batch size of the random check batch (default: {DEFAULT_CHECK_BATCH})",
    )
    parser.add_argument(
        "--tolerance",
        type=non_negative_float,
        default=DEFAULT_TOLERANCE,
        help=f"largest accepted relative difference (default: {DEFAULT_TOLERANCE:g})",
    )
    parser.add_argument("--opset", type=positive_int, help="ONNX opset (default: the exporter's)")
    parser.add_argument("--network", help="architecture of a checkpoint file that does not say it")
    parser.add_argument("--device", default="cpu", help="device to trace and check on (default: cpu)")
    parser.set_defaults(func=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Load the model, export it, and print the check's summary."""
    # What can be refused without the model is refused before loading it (a published model may be a download)
    check_destination(args.output, resolve_format(args.format, args.output))
    net, info = load_pretrained_model(args.model, inference=True, device=args.device, network=args.network)
    report = export_model(
        net,
        args.output,
        format=args.format,
        output=args.returns,
        size=tuple(args.size) if args.size else None,
        dynamic_size=args.dynamic_size,
        patch_size=args.patch_size,
        class_to_idx=info.class_to_idx,
        rgb_stats=info.rgb_stats,
        tolerance=args.tolerance,
        check_batch=args.batch,
        opset=args.opset,
    )
    print(report.summary())
    return 0
