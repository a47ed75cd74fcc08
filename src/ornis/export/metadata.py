"""The metadata an export carries: the checkpoint's facts (``task``, ``class_to_idx``, ``signature``, ``rgb_stats``,
``network``) and an ``export`` record, stored as JSON strings under ``META_KEYS`` (TorchScript ``_extra_files``,
``torch.export.save`` ``extra_files``, ONNX metadata properties)."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ornis._version import __version__
from ornis.errors import CheckpointFormatError
from ornis.export.request import ExportRequest
from ornis.models.base import Encoder
from ornis.weights.checkpoint import DEFAULT_RGB_STATS

META_KEYS = ("ornis_version", "task", "class_to_idx", "signature", "rgb_stats", "network", "export")
REQUIRED_KEYS = ("task", "class_to_idx", "signature", "rgb_stats")


@dataclass(frozen=True)
class ExportRecord:
    """How a file was exported (the ``export`` entry of its metadata)."""

    format: str
    output: str
    output_names: list[str]
    size: list[int]
    dynamic_size: bool
    patch_size: int | None
    num_classes: int


@dataclass(frozen=True)
class ExportMetadata:
    """The metadata read back from an export; ``export`` is the ``ExportRecord`` as a dict (``{}`` when absent)."""

    ornis_version: str
    task: str
    class_to_idx: dict[str, int]
    signature: dict[str, Any]
    rgb_stats: dict[str, Any]
    network: str
    export: dict[str, Any]

    @property
    def input_shape(self) -> list[int]:
        """The input's (batch, channels, H, W) from the signature (batch 0; H, W the traced size)."""
        return [int(s) for s in self.signature["inputs"][0]["data_shape"]]

    def as_dict(self) -> dict[str, Any]:
        """The metadata as a plain dict keyed by ``META_KEYS``."""
        return dataclasses.asdict(self)


def export_signature(
    net: Encoder, size: tuple[int, int], dynamic_size: bool, sample_outputs: list[torch.Tensor]
) -> dict[str, Any]:
    """The reference-style signature of an export: batch (and, for a dynamic size, spatial) dimensions are 0, except
    the input's H and W, which stay the traced size (what ``get_size_from_signature`` reads)."""
    outputs = []
    for t in sample_outputs:
        shape = [0, *t.shape[1:]]
        if dynamic_size and t.ndim == 4:
            shape[2:] = [0, 0]
        outputs.append({"data_shape": [int(s) for s in shape]})
    return {"inputs": [{"data_shape": [0, net.input_channels, *size]}], "outputs": outputs}


def export_metadata(
    net: Encoder,
    request: ExportRequest,
    output_names: list[str],
    class_to_idx: dict[str, int] | None,
    rgb_stats: dict[str, Any] | None,
    sample_outputs: list[torch.Tensor],
) -> dict[str, str]:
    """The metadata to embed in the file, as strings keyed by ``META_KEYS``."""
    record = ExportRecord(
        format=request.format,
        output=request.output,
        output_names=output_names,
        size=list(request.size),
        dynamic_size=request.dynamic_size,
        patch_size=request.patch_size,
        num_classes=net.num_classes,
    )
    classes = class_to_idx if class_to_idx is not None else {str(i): i for i in range(net.num_classes)}
    signature = export_signature(net, request.size, request.dynamic_size, sample_outputs)
    return {
        "ornis_version": __version__,
        "task": net.task,
        "class_to_idx": json.dumps(classes),
        "signature": json.dumps(signature),
        "rgb_stats": json.dumps(rgb_stats or DEFAULT_RGB_STATS),
        "network": net.name,
        "export": json.dumps(dataclasses.asdict(record)),
    }


def parse_metadata(extra: dict[str, str], path: Path) -> ExportMetadata:
    """The metadata strings read from a file, parsed; ``CheckpointFormatError`` naming the file when some are
    missing or not JSON."""
    missing = [k for k in REQUIRED_KEYS if not extra.get(k)]
    if missing:
        raise CheckpointFormatError(
            path, f"the export lacks metadata {', '.join(missing)} (not written by ornis export?)"
        )
    try:
        return ExportMetadata(
            ornis_version=extra.get("ornis_version", ""),
            task=extra["task"],
            class_to_idx=json.loads(extra["class_to_idx"]),
            signature=json.loads(extra["signature"]),
            rgb_stats=json.loads(extra["rgb_stats"]),
            network=extra.get("network", ""),
            export=json.loads(extra["export"]) if extra.get("export") else {},
        )
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(path, f"the export's metadata is not valid JSON ({e})") from None
