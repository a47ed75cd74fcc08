"""The writers: an ``ExportHead`` traced to TorchScript, captured with ``torch.export``, or converted to ONNX, with
the metadata embedded in the file. Each writes to the path it is given (a temporary name; the caller renames)."""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ornis.errors import ExportError, first_line
from ornis.export.head import ExportHead
from ornis.export.request import ExportRequest


def write_graph(
    head: ExportHead,
    example: torch.Tensor,
    dst: Path,
    meta: dict[str, str],
    request: ExportRequest,
    output_names: list[str],
    opset: int | None,
) -> None:
    """Write ``head`` to ``dst`` in ``request.format``; ``ExportError`` naming the exporter's failure."""
    try:
        with torch.no_grad():
            if request.format == "pts":
                write_pts(head, example, dst, meta)
            elif request.format == "pt2":
                write_pt2(head, example, dst, meta, request.dynamic_size)
            else:
                write_onnx(head, example, dst, meta, output_names, request.dynamic_size, opset)
    except ExportError:
        raise
    except Exception as e:  # torch's exporters raise many types; all mean "this graph could not be made"
        what = (
            f"{request.format} export with a dynamic input size" if request.dynamic_size else f"{request.format} export"
        )
        raise ExportError(f"{head.net.name}: {what} failed: {first_line(e)}") from e


def write_pts(head: ExportHead, example: torch.Tensor, dst: Path, meta: dict[str, str]) -> None:
    """TorchScript, by tracing every card-API method at ``example``'s shape."""
    inputs = {
        "forward": (example,),
        "embedding": (example,),
        "classify": (head.embedding(example),),
        "detection_features": (example,),
    }
    with warnings.catch_warnings():
        # Tracer warnings name the Python branches that get frozen, which is why pts has a fixed input size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        traced = torch.jit.trace_module(head, inputs, strict=False, check_trace=False, _store_inputs=False)
        torch.jit.save(traced, str(dst), _extra_files=meta)


def dynamic_shapes(dynamic_size: bool) -> dict[str, dict[int, Any]]:
    """``torch.export`` dynamic dimensions of input ``x``: the batch always, H and W for a dynamic size."""
    dims: dict[int, Any] = {0: torch.export.Dim.DYNAMIC}
    if dynamic_size:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    return {"x": dims}


def write_pt2(head: ExportHead, example: torch.Tensor, dst: Path, meta: dict[str, str], dynamic_size: bool) -> None:
    """A ``torch.export`` program."""
    program = torch.export.export(head, (example,), dynamic_shapes=dynamic_shapes(dynamic_size))
    torch.export.save(program, dst, extra_files=meta)


def write_onnx(
    head: ExportHead,
    example: torch.Tensor,
    dst: Path,
    meta: dict[str, str],
    output_names: list[str],
    dynamic_size: bool,
    opset: int | None,
) -> None:
    """ONNX, through torch's dynamo exporter (input ``x``, outputs named ``output_names``)."""
    # The exporter narrates its steps on stdout and its optimiser logs every pass at INFO
    with contextlib.redirect_stdout(io.StringIO()), _quiet_loggers("onnx_ir", "onnxscript", "torch.onnx"):
        program = torch.onnx.export(
            head,
            (example,),
            dynamo=True,
            input_names=["x"],
            output_names=output_names,
            dynamic_shapes=dynamic_shapes(dynamic_size),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    program.model.metadata_props.update(meta)
    program.save(dst, external_data=False)


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
