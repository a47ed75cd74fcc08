"""Reading exports back: the format from the file's contents, the graph and its metadata, and ``ExportedModel``,
what ``load_exported`` (and ``ornis.load_pretrained_model`` on a ``.pts`` / ``.pt2`` file) returns."""

from __future__ import annotations

import os
import warnings
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ornis.errors import CheckpointFormatError, ExportError, first_line
from ornis.export.metadata import META_KEYS, ExportMetadata, parse_metadata
from ornis.loading import EXPORT_FORMATS, ModelInfo, register_export_reader
from ornis.weights.checkpoint import require_regular_file

# A .pt2 program has one method, forward: the card API's name for what it computes
_PT2_METHODS = {"embedding": "embedding", "features": "detection_features"}


class ExportedModel(nn.Module):
    """A model read from an exported file: a fixed graph, not an ``Encoder``.

    ``forward`` returns the output chosen at export (``output``). A ``.pts`` file keeps ``embedding``, ``classify``
    and ``detection_features`` too; a ``.pt2`` program has only its forward, reachable under the card API's name for
    it (``embedding`` or ``detection_features``). ``task``, ``size`` (the traced (H, W)) and ``input_channels`` come
    from the file's metadata. A ``.pt2`` graph cannot switch between train and eval mode; it was captured in eval.
    """

    def __init__(self, graph: nn.Module, file_format: str, meta: ExportMetadata) -> None:
        super().__init__()
        self.graph = graph
        self.file_format = file_format
        self.output = str(meta.export.get("output", ""))
        self.task = meta.task
        shape = meta.input_shape
        self.size = (shape[2], shape[3])
        self.input_channels = shape[1]

    def forward(self, x: torch.Tensor) -> Any:
        """The output chosen at export."""
        return self.graph(x)

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding (B, D), where the file computes it."""
        return self._method("embedding")(x)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits for an embedding, where the file computes them (``.pts`` only)."""
        return self._method("classify")(embedding)

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The detection feature maps, where the file computes them."""
        return self._method("detection_features")(x)

    def _method(self, name: str) -> Callable[[torch.Tensor], Any]:
        if self.file_format == "pts":
            return getattr(self.graph, name)
        if _PT2_METHODS.get(self.output) == name:
            return self.graph
        raise ExportError(
            f"this {self.file_format} file computes {self.output!r} only (its forward), not {name}; export another "
            "file for that output, or use the .pts format, which keeps every method"
        )

    def train(self, mode: bool = True) -> ExportedModel:
        """Set train / eval mode (a TorchScript graph follows; a torch.export graph stays as captured, in eval)."""
        self.training = mode
        if self.file_format == "pts":
            self.graph.train(mode)
        return self


def sniff_export_format(path: str | os.PathLike) -> str:
    """``"pts"``, ``"pt2"`` or ``"onnx"``, from the file's contents (both torch formats are zip archives)."""
    path = Path(path)
    require_regular_file(path)
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        if any("/code/" in n for n in names):
            return "pts"
        if any(n.endswith("/archive_format") or "/models/" in n for n in names):
            return "pt2"
        raise CheckpointFormatError(
            path, "a zip archive, but neither a TorchScript (.pts) nor a torch.export (.pt2) file"
        )
    if path.suffix.lower() == ".onnx":
        return "onnx"
    raise CheckpointFormatError(
        path, "not an exported model: expected a TorchScript (.pts), torch.export (.pt2) or ONNX file"
    )


def load_graph(path: Path, fmt: str, device: torch.device | str | None) -> tuple[nn.Module, dict[str, str]]:
    """The graph of a ``.pts`` / ``.pt2`` file on ``device`` and its raw metadata strings."""
    extra = dict.fromkeys(META_KEYS, "")
    if fmt == "pts":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    else:
        module = torch.export.load(path, extra_files=extra).module()
        if device is not None:
            module.to(device)
    return module, {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}


def load_exported(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    inference: bool = False,
) -> tuple[ExportedModel, ModelInfo]:
    """Load a ``.pts`` or ``.pt2`` export as ``(ExportedModel, ModelInfo)``, like the reference's ``file_format``
    argument; ``model_info.custom_config["export"]`` says how the file was exported. ``dtype`` casts the weights
    (graphs traced in float32 may still compute parts in float32); ``inference`` sets eval mode, gradients off."""
    path = Path(path)
    fmt = sniff_export_format(path)
    if fmt == "onnx":
        raise CheckpointFormatError(path, "ONNX files run with onnxruntime: ornis.export.load_onnx_session(path)")
    try:
        graph, extra = load_graph(path, fmt, device)
    except (RuntimeError, OSError, ValueError) as e:
        raise CheckpointFormatError(path, f"cannot be loaded as a {fmt} export ({first_line(e)})") from None
    meta = parse_metadata(extra, path)
    model = ExportedModel(graph, fmt, meta)
    if dtype is not None:
        model.to(dtype)
    if inference:
        model.eval()
        model.requires_grad_(False)
    info = ModelInfo(
        meta.class_to_idx, meta.signature, meta.rgb_stats, {"export": meta.export}, meta.network or None, path
    )
    return model, info


def load_onnx_session(path: str | os.PathLike, providers: Sequence[str] | None = None) -> Any:
    """An ``onnxruntime.InferenceSession`` for an ONNX export (input ``x``; outputs named as at export)."""
    try:
        import onnxruntime
    except ImportError:
        raise ExportError(
            "running ONNX files needs onnxruntime, which ornis does not depend on: pip install onnxruntime"
        ) from None
    return onnxruntime.InferenceSession(str(path), providers=list(providers or ["CPUExecutionProvider"]))


def read_export_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata stored in an export of any format: ``task``, ``class_to_idx``, ``signature``, ``rgb_stats``,
    ``network`` and ``export`` (output, output names, size, dynamic size, patch size, format)."""
    path = Path(path)
    fmt = sniff_export_format(path)
    if fmt == "onnx":
        extra = dict(load_onnx_session(path).get_modelmeta().custom_metadata_map)
    else:
        # Both torch formats keep extra files as <archive>/extra/<key>: read them without loading the model
        with zipfile.ZipFile(path) as archive:
            extra = {
                parts[2]: archive.read(name).decode()
                for name in archive.namelist()
                if len(parts := name.split("/")) == 3 and parts[1] == "extra" and parts[2] in META_KEYS
            }
    return parse_metadata(extra, path).as_dict()


for _format in EXPORT_FORMATS:
    register_export_reader(_format, load_exported)
