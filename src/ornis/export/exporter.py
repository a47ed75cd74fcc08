"""``export_model``: validate the request, write the file under a temporary name, check it against the eager model,
and only then rename it into place."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ornis.errors import ExportError
from ornis.export.check import CheckResult, check_export
from ornis.export.head import ExportHead, as_list
from ornis.export.metadata import export_metadata
from ornis.export.request import (
    DEFAULT_CHECK_BATCH,
    DEFAULT_OUTPUT,
    DEFAULT_TOLERANCE,
    ExportRequest,
    export_request,
    size_step,
)
from ornis.export.write import write_graph
from ornis.models.base import Encoder
from ornis.utils.fs import atomic_path

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportReport:
    """What was written and how closely it matches the eager model."""

    path: Path
    format: str
    output: str
    output_names: tuple[str, ...]
    size: tuple[int, int]
    dynamic_size: bool
    max_abs_diff: float
    max_rel_diff: float  # max |exported - eager| / max |eager|, over every output and checked input
    checked_inputs: tuple[tuple[int, ...], ...]

    @classmethod
    def of(
        cls,
        path: Path,
        request: ExportRequest,
        output_names: list[str],
        result: CheckResult,
        inputs: list[torch.Tensor],
    ) -> ExportReport:
        """The report of a checked export of ``request`` to ``path``."""
        return cls(
            path=path,
            format=request.format,
            output=request.output,
            output_names=tuple(output_names),
            size=request.size,
            dynamic_size=request.dynamic_size,
            max_abs_diff=result.max_abs_diff,
            max_rel_diff=result.max_rel_diff,
            checked_inputs=tuple(tuple(x.shape) for x in inputs),
        )

    def summary(self) -> str:
        """One line for a person: what was written where, and the check's worst difference."""
        size = "dynamic" if self.dynamic_size else f"{self.size[0]}x{self.size[1]}"
        shapes = ", ".join("x".join(map(str, s)) for s in self.checked_inputs)
        return (
            f"exported {self.output} ({', '.join(self.output_names)}) as {self.format} to {self.path} "
            f"[batch dynamic, size {size}]; check on inputs {shapes}: worst difference {self.max_abs_diff:.3g} "
            f"absolute, {self.max_rel_diff:.3g} relative to the output scale"
        )


def export_model(
    net: Encoder,
    path: str | Path,
    *,
    format: str | None = None,
    output: str = DEFAULT_OUTPUT,
    size: tuple[int, int] | int | None = None,
    dynamic_size: bool = False,
    patch_size: int | None = None,
    class_to_idx: dict[str, int] | None = None,
    rgb_stats: dict[str, Any] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    check_batch: int = DEFAULT_CHECK_BATCH,
    opset: int | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export ``net`` to ``path`` and check the written file against the eager model.

    format
        ``"pts"``, ``"pt2"`` or ``"onnx"``; by default from the suffix of ``path``.
    output
        ``"embedding"``, ``"logits"`` or ``"features"`` (the ``detection_features`` maps).
    size, dynamic_size
        The (H, W) the graph is traced at and, unless ``dynamic_size``, the only size it accepts (default: the
        model's size). See ``ornis.export`` for which formats and families allow a dynamic size.
    patch_size
        FlexiViT: the patch size baked into the export (default: the model's).
    class_to_idx, rgb_stats
        Metadata stored in the file (as in the checkpoint the model came from).
    tolerance
        Largest accepted difference between exported and eager outputs, relative to the eager output's scale.
    check_batch
        Batch size of the random batch the check runs (a batch of 1 is checked too).

    Raises ``ExportError`` (bad request, unwritable destination, export failure) or ``ExportCheckError`` (outputs
    differ); in both cases nothing is left at ``path`` or beside it.
    """
    path = Path(path)
    if not tolerance >= 0:  # also NaN
        raise ExportError(f"tolerance must be a number of at least 0, found {tolerance!r}")
    request = export_request(
        net,
        path,
        format=format,
        output=output,
        size=size,
        dynamic_size=dynamic_size,
        patch_size=patch_size,
        check_batch=check_batch,
    )
    was_training = net.training
    net.eval()
    try:
        head = ExportHead(net, request.output, request.patch_size).eval()
        example, inputs = _inputs(net, request, seed)
        with torch.no_grad():
            # Eager first: it also fills Python-side caches (FlexiViT's resize matrices) outside the tracer
            eager = [head(x) for x in inputs]
        output_names = list(eager[0]) if isinstance(eager[0], dict) else [request.output]  # maps keep stage names
        expected = [as_list(out) for out in eager]
        meta = export_metadata(net, request, output_names, class_to_idx, rgb_stats, expected[1])
        with contextlib.ExitStack() as stack:
            tmp = _temporary(stack, path)
            write_graph(head, example, tmp, meta, request, output_names, opset)
            result = check_export(tmp, request.format, example.device, inputs, expected, output_names, path)
            result.require(tolerance, path)
    finally:
        net.train(was_training)

    report = ExportReport.of(path, request, output_names, result, inputs)
    logger.debug(report.summary())  # the caller shows it (the CLI prints it once); a library stays quiet
    return report


def _inputs(net: Encoder, request: ExportRequest, seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The example the graph is traced at (batch 2) and the checked inputs: a batch of 1, a batch of
    ``check_batch``, and for a dynamic size a batch at another size the model accepts."""
    param = next(net.parameters())
    gen = torch.Generator().manual_seed(seed)

    def draw(batch: int, size: tuple[int, int]) -> torch.Tensor:
        return torch.randn(batch, 3, *size, generator=gen).to(param.device, param.dtype)

    example = draw(2, request.size)
    inputs = [example[:1], draw(request.check_batch, request.size)]
    if request.dynamic_size:
        step = size_step(net, request.patch_size)
        inputs.append(draw(2, (request.size[0] + step, request.size[1] + 2 * step)))
    return example, inputs


def _temporary(stack: contextlib.ExitStack, path: Path) -> Path:
    """A temporary file beside ``path`` that replaces it when ``stack`` closes without an error (removed otherwise);
    ``ExportError`` when the output folder cannot be made or written."""
    try:
        return stack.enter_context(atomic_path(path))
    except OSError as e:
        raise ExportError(f"{path}: the output folder {path.parent} cannot be written ({e.strerror or e})") from None
