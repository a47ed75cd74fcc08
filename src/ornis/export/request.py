"""What an export may be asked for: formats, outputs, the input-size rules, and the checks that turn a bad request
into an ``ExportError`` before any work is done."""

from __future__ import annotations

import importlib.util
import inspect
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from ornis.errors import ExportError
from ornis.models.base import Encoder

FORMATS = ("pts", "pt2", "onnx")
OUTPUTS = ("embedding", "logits", "features")
DEFAULT_OUTPUT = "embedding"
DEFAULT_TOLERANCE = 1e-4
DEFAULT_CHECK_BATCH = 3

# family -> why its graph cannot take another input size than the one it was exported for
_PINNED = (
    "its input-size check (ornis.models.hierarchical.check_size) turns the sides into Python ints, "
    "pinning a trace to one size"
)
FIXED_SIZE_FAMILIES: dict[str, str] = {
    "hiera": f"{_PINNED}; export one file per input size with --size H W",
    "hieradet": (
        f"{_PINNED}, and even without that, the padding of its attention windows over a symbolic size is beyond "
        "torch.export's shape solver; export one file per input size with --size H W"
    ),
}


@dataclass(frozen=True)
class ExportRequest:
    """A checked export request: the format, the output the graph returns, the (H, W) it is traced at, whether
    that size is dynamic, the FlexiViT patch size baked in (None: the model's) and the check's batch size."""

    format: str
    output: str
    size: tuple[int, int]
    dynamic_size: bool
    patch_size: int | None
    check_batch: int


def resolve_format(format: str | None, path: str | os.PathLike) -> str:
    """The export format: as given, or from the file's suffix (``.pts``, ``.pt2``, ``.onnx``)."""
    if format is None:
        suffix = Path(path).suffix.lstrip(".").lower()
        if suffix not in FORMATS:
            raise ExportError(
                f"{path}: cannot tell the export format from the suffix {suffix!r}; "
                f"expected one of {', '.join(FORMATS)}"
            )
        return suffix
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}")
    return format


def dynamic_size_refusal(net: Encoder, format: str) -> str | None:
    """Why ``net`` cannot be exported to ``format`` with a dynamic input size; ``None`` when it can."""
    if format == "pts":
        return (
            "TorchScript export traces one run, freezing every branch on the input size at the traced size; "
            "use --format pt2 or onnx for a dynamic size, or export with a fixed --size"
        )
    return FIXED_SIZE_FAMILIES.get(getattr(net, "family", ""))


def export_request(
    net: Encoder,
    path: Path,
    *,
    format: str | None,
    output: str,
    size: tuple[int, int] | int | None,
    dynamic_size: bool,
    patch_size: int | None,
    check_batch: int,
) -> ExportRequest:
    """Check an export request against the model; ``ExportError`` saying what cannot be done and why."""
    fmt = resolve_format(format, path)
    if output not in OUTPUTS:
        raise ExportError(f"unknown export output {output!r}; expected one of {', '.join(OUTPUTS)}")
    if not isinstance(net, Encoder):
        raise ExportError(
            f"expected an ornis encoder to export, found a {type(net).__name__} "
            "(an exported file cannot be re-exported)"
        )
    if output == "logits" and net.num_classes == 0:
        raise ExportError(f"{net.name} has no classification head (num_classes=0): export output 'embedding' instead")
    if patch_size is not None and "patch_size" not in inspect.signature(net.embedding).parameters:
        raise ExportError(
            f"{net.name}: patch_size is a FlexiViT / ViT option; family {net.family!r} has a fixed patch size"
        )
    if dynamic_size and (why := dynamic_size_refusal(net, fmt)) is not None:
        raise ExportError(f"{net.name} cannot be exported to {fmt} with a dynamic input size: {why}")
    if isinstance(check_batch, bool) or not isinstance(check_batch, int) or check_batch < 1:
        raise ExportError(f"check_batch must be an integer of at least 1, found {check_batch!r}")
    if patch_size is not None and (isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1):
        raise ExportError(f"patch_size must be a positive integer, found {patch_size!r}")
    hw = export_size(net, size, patch_size)
    check_destination(path, fmt)
    if fmt == "onnx":
        require_onnx_tools()
    return ExportRequest(fmt, output, hw, dynamic_size, patch_size, check_batch)


def export_size(net: Encoder, size: tuple[int, int] | int | None, patch_size: int | None) -> tuple[int, int]:
    """The (H, W) to trace at: ``size`` (an int is square) or the model's; ``ExportError`` unless both sides are
    positive multiples of the model's stride (its patch size for a ViT, 32 for Hiera / HieraDet)."""
    if size is None:
        return (int(net.size[0]), int(net.size[1]))
    sides = (size, size) if isinstance(size, int) else tuple(size)
    step = size_step(net, patch_size)
    if len(sides) != 2 or any(
        isinstance(s, bool) or not isinstance(s, numbers.Integral) or s < 1 or s % step for s in sides
    ):
        raise ExportError(
            f"{net.name}: export size {size!r} is not two positive multiples of {step} (the model's stride); "
            f"e.g. {tuple(int(s) for s in net.size)}"
        )
    return (int(sides[0]), int(sides[1]))


def check_destination(path: str | os.PathLike, format: str | None = None) -> None:
    """``ExportError`` before any work when ``path`` cannot become the exported file: it is a folder, or its
    folder is a file or cannot be written. (A missing folder is fine: it is made.)"""
    path = Path(path)
    if path.is_dir():
        example = path / f"model.{format or 'pt2'}"
        raise ExportError(f"{path} is a folder; the output names the file to write, e.g. {example}")
    folder = next((p for p in path.parents if p.exists()), Path("."))
    if not folder.is_dir():
        why = "Not a directory"
    elif not os.access(folder, os.W_OK | os.X_OK):
        why = "Permission denied"
    else:
        return
    raise ExportError(f"{path}: the output folder {path.parent} cannot be written ({why})")


def require_onnx_tools() -> None:
    """ONNX export needs onnx + onnxscript (torch's exporter) and onnxruntime (the check); none is an ornis
    dependency."""
    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}, which ornis does not depend on: pip install {' '.join(missing)}"
        )


def size_step(net: Encoder, patch_size: int | None) -> int:
    """The smallest change of input side the model accepts (the patch size for a plain ViT, else the total stride)."""
    return int(patch_size or getattr(net, "max_stride", 0) or getattr(net, "patch_size", 0) or 32)
