"""The post-write check: the written file, loaded back, run beside the eager model's outputs on the same inputs."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ornis.errors import ExportCheckError, first_line
from ornis.export.head import as_list
from ornis.export.read import load_graph, load_onnx_session


class CheckResult(NamedTuple):
    """The worst difference between exported and eager outputs, over every output and checked input."""

    max_abs_diff: float
    max_rel_diff: float  # max |exported - eager| / max |eager|

    def require(self, tolerance: float, path: Path) -> None:
        """``ExportCheckError`` naming ``path`` unless the relative difference is within ``tolerance`` (a NaN
        difference fails too)."""
        if not self.max_rel_diff <= tolerance:  # also catches NaN
            raise ExportCheckError(
                f"{path}: the exported model differs from the eager model by {self.max_rel_diff:.3g} relative to the "
                f"output scale ({self.max_abs_diff:.3g} absolute), above the tolerance {tolerance:g}; the file was "
                "deleted"
            )


def exported_runner(path: Path, fmt: str, device: torch.device) -> Callable[[torch.Tensor], list[Any]]:
    """A function running the file at ``path`` on one input, returning its outputs as a list."""
    if fmt == "onnx":
        session = load_onnx_session(path)
        return lambda x: session.run(None, {"x": x.detach().cpu().numpy()})
    module = load_graph(path, fmt, device)[0]
    return lambda x: as_list(module(x))


def check_export(
    written: Path,
    fmt: str,
    device: torch.device,
    inputs: list[torch.Tensor],
    expected: list[list[torch.Tensor]],
    output_names: list[str],
    path: Path,
) -> CheckResult:
    """Run the ``written`` file on ``inputs`` and compare with ``expected`` (the eager outputs); a file that fails
    on an input or returns other shapes raises ``ExportCheckError`` naming ``path``, its final name."""
    abs_diff, rel_diff = 0.0, 0.0
    run = exported_runner(written, fmt, device)
    for x, want in zip(inputs, expected):
        try:
            with torch.no_grad():
                got = run(x)
        except Exception as e:  # a graph that cannot run an input it claims to accept is a failed check
            raise ExportCheckError(
                f"{path}: the exported model fails on input {tuple(x.shape)}: {first_line(e)}; the file was deleted"
            ) from e
        if len(got) != len(want):
            raise ExportCheckError(f"{path}: the exported model returned {len(got)} outputs, expected {len(want)}")
        for name, g, w in zip(output_names, got, want):
            g = torch.as_tensor(g).to(w.device)
            if tuple(g.shape) != tuple(w.shape):
                raise ExportCheckError(
                    f"{path}: exported output {name!r} has shape {tuple(g.shape)} for input {tuple(x.shape)}, "
                    f"expected {tuple(w.shape)}"
                )
            diff = float((g.double() - w.double()).abs().max())
            abs_diff = max(abs_diff, diff)
            rel_diff = max(rel_diff, diff / max(float(w.double().abs().max()), 1e-6))
    return CheckResult(abs_diff, rel_diff)
