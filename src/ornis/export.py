"""Export an encoder for deployment: TorchScript (``.pts``), ``torch.export`` programs (``.pt2``) and ONNX (``.onnx``).

The exported graph computes one output of the encoder, chosen at export time: the ``embedding`` (B, D), the
``logits`` (B, num_classes) or the detection ``features`` (one (B, C, h, w) map per stage, named as
``net.return_stages``). The batch size is always dynamic. The input size is fixed (the size given, by default the
model's) unless ``dynamic_size=True``, which ``pt2`` and ``onnx`` support for the ViT / FlexiViT family (inputs whose
sides are multiples of the patch size; position embeddings are interpolated in the graph). Not supported:

* ``pts`` with a dynamic size: TorchScript files are made by tracing, which records one run; every branch on the
  input size (e.g. "interpolate the position embeddings only for another grid") is frozen at the traced size.
* Hiera and HieraDet (``FIXED_SIZE_FAMILIES`` says why): one file per input size, with ``size=(H, W)``.

Every export is checked before it is kept: the file is written under a temporary name, loaded back, and run on
random batches beside the eager model; the worst difference (relative to the eager output's scale) must be within
``tolerance``, else the file is deleted and ``ExportCheckError`` raised. Only a checked file is renamed into place.

The files carry the checkpoint's metadata (``task``, ``class_to_idx``, ``signature``, ``rgb_stats``, ``network`` and
an ``export`` record), as TorchScript ``_extra_files``, ``torch.export.save`` ``extra_files`` or ONNX metadata
properties, so ``ornis.load_pretrained_model(path, file_format="pts" | "pt2")`` returns ``(module, ModelInfo)``.
A ``.pts`` module keeps ``embedding``, ``classify`` and ``detection_features`` beside ``forward`` (the chosen
output); a ``.pt2`` program has ``forward`` only. ONNX files run with ``onnxruntime`` (not a dependency of ornis).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import logging
import os
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ornis.errors import CheckpointFormatError, ExportCheckError, ExportError
from ornis.models.base import Encoder

logger = logging.getLogger(__name__)

FORMATS = ("pts", "pt2", "onnx")
OUTPUTS = ("embedding", "logits", "features")
DEFAULT_TOLERANCE = 1e-4
META_KEYS = ("ornis_version", "task", "class_to_idx", "signature", "rgb_stats", "network", "export")

# family -> why its graph cannot take another input size than the one it was exported for
_PINNED = (
    "its input-size check (ornis.models.hiera.check_size) turns the sides into Python ints, pinning a trace to one size"
)
FIXED_SIZE_FAMILIES: dict[str, str] = {
    "hiera": f"{_PINNED}; export one file per input size with --size H W",
    "hieradet": (
        f"{_PINNED}, and even without that, the padding of its attention windows over a symbolic size is beyond "
        "torch.export's shape solver; export one file per input size with --size H W"
    ),
}


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

    def summary(self) -> str:
        size = "dynamic" if self.dynamic_size else f"{self.size[0]}x{self.size[1]}"
        shapes = ", ".join("x".join(map(str, s)) for s in self.checked_inputs)
        return (
            f"exported {self.output} ({', '.join(self.output_names)}) as {self.format} to {self.path} "
            f"[batch dynamic, size {size}]; check on inputs {shapes}: worst difference {self.max_abs_diff:.3g} "
            f"absolute, {self.max_rel_diff:.3g} relative to the output scale"
        )


class ExportHead(nn.Module):
    """The encoder cut at one output, as ``forward(x)``: what an exported graph computes. ``embedding``,
    ``classify`` and ``detection_features`` stay as methods so a TorchScript file keeps the card API."""

    def __init__(self, net: Encoder, output: str, patch_size: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.output = output
        self.patch_size = patch_size

    def _kwargs(self) -> dict[str, int]:
        return {"patch_size": self.patch_size} if self.patch_size is not None else {}

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.embedding(x, **self._kwargs())

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.net.classify(embedding)

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net.detection_features(x, **self._kwargs())

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        if self.output == "embedding":
            return self.embedding(x)
        if self.output == "logits":
            return self.classify(self.embedding(x))
        return self.detection_features(x)


def resolve_format(format: str | None, path: str | os.PathLike) -> str:
    """The export format: as given, or from the file's suffix (``.pts``, ``.pt2``, ``.onnx``)."""
    if format is None:
        suffix = Path(path).suffix.lstrip(".").lower()
        if suffix not in FORMATS:
            raise ExportError(
                f"{path}: cannot tell the export format from the suffix {suffix!r}; expected one of {', '.join(FORMATS)}"
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


def export_model(
    net: Encoder,
    path: str | os.PathLike,
    *,
    format: str | None = None,
    output: str = "embedding",
    size: tuple[int, int] | int | None = None,
    dynamic_size: bool = False,
    patch_size: int | None = None,
    class_to_idx: dict[str, int] | None = None,
    rgb_stats: dict[str, Any] | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    check_batch: int = 3,
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
        model's size). See the module docstring for which formats and families allow a dynamic size.
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
    fmt = resolve_format(format, path)
    if output not in OUTPUTS:
        raise ExportError(f"unknown export output {output!r}; expected one of {', '.join(OUTPUTS)}")
    if not isinstance(net, Encoder):
        raise ExportError(
            f"expected an ornis encoder to export, found a {type(net).__name__} (an exported file cannot be re-exported)"
        )
    if output == "logits" and net.num_classes == 0:
        raise ExportError(f"{net.name} has no classification head (num_classes=0): export output 'embedding' instead")
    if patch_size is not None and "patch_size" not in inspect.signature(net.embedding).parameters:
        raise ExportError(
            f"{net.name}: patch_size is a FlexiViT / ViT option; family {net.family!r} has a fixed patch size"
        )
    if dynamic_size and (why := dynamic_size_refusal(net, fmt)) is not None:
        raise ExportError(f"{net.name} cannot be exported to {fmt} with a dynamic input size: {why}")
    size = net.size if size is None else ((size, size) if isinstance(size, int) else (int(size[0]), int(size[1])))
    if check_batch < 1:
        raise ExportError(f"check_batch must be at least 1, found {check_batch}")
    if fmt == "onnx":
        _require_onnx_tools()

    tmp = _reserve_temporary(path)
    was_training = net.training
    net.eval()
    try:
        head = ExportHead(net, output, patch_size).eval()
        param = next(net.parameters())
        gen = torch.Generator().manual_seed(seed)
        example = torch.randn(2, 3, *size, generator=gen).to(param.device, param.dtype)
        check_inputs = [example[:1], torch.randn(check_batch, 3, *size, generator=gen).to(param.device, param.dtype)]
        if dynamic_size:
            step = _size_step(net, patch_size)
            other = (size[0] + step, size[1] + 2 * step)
            check_inputs.append(torch.randn(2, 3, *other, generator=gen).to(param.device, param.dtype))
        with torch.no_grad():
            # Eager first: it also fills Python-side caches (FlexiViT's resize matrices) outside the tracer
            eager = [head(x) for x in check_inputs]
        output_names = list(eager[0]) if isinstance(eager[0], dict) else [output]  # feature maps keep their stage names
        expected = [_as_list(out) for out in eager]
        meta = _metadata(
            net, fmt, output, output_names, size, dynamic_size, patch_size, class_to_idx, rgb_stats, expected[1]
        )
        try:
            with torch.no_grad():
                if fmt == "pts":
                    _write_pts(head, example, tmp, meta)
                elif fmt == "pt2":
                    _write_pt2(head, example, tmp, meta, dynamic_size)
                else:
                    _write_onnx(head, example, tmp, meta, output_names, dynamic_size, opset)
        except ExportError:
            raise
        except Exception as e:  # torch's exporters raise many types; all mean "this graph could not be made"
            what = f"{fmt} export with a dynamic input size" if dynamic_size else f"{fmt} export"
            raise ExportError(f"{net.name}: {what} failed: {_first_line(e)}") from e

        abs_diff, rel_diff = _check_export(tmp, fmt, param.device, check_inputs, expected, output_names, path)
        if not rel_diff <= tolerance:  # also catches NaN
            raise ExportCheckError(
                f"{path}: the exported model differs from the eager model by {rel_diff:.3g} relative to the output "
                f"scale ({abs_diff:.3g} absolute), above the tolerance {tolerance:g}; the file was deleted"
            )
        os.replace(tmp, path)
    finally:
        net.train(was_training)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)

    report = ExportReport(
        path=path,
        format=fmt,
        output=output,
        output_names=tuple(output_names),
        size=size,
        dynamic_size=dynamic_size,
        max_abs_diff=abs_diff,
        max_rel_diff=rel_diff,
        checked_inputs=tuple(tuple(x.shape) for x in check_inputs),
    )
    logger.info(report.summary())
    return report


def _check_export(
    written: Path,
    fmt: str,
    device: torch.device,
    inputs: list[torch.Tensor],
    expected: list[list[torch.Tensor]],
    output_names: list[str],
    path: Path,
) -> tuple[float, float]:
    """Run the written file on ``inputs``: the worst (absolute, scale-relative) difference from ``expected``."""
    abs_diff, rel_diff = 0.0, 0.0
    run = _exported_runner(written, fmt, device)
    for x, want in zip(inputs, expected):
        try:
            with torch.no_grad():
                got = run(x)
        except Exception as e:  # a graph that cannot run an input it claims to accept is a failed check
            raise ExportCheckError(
                f"{path}: the exported model fails on input {tuple(x.shape)}: {_first_line(e)}; the file was deleted"
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
    return abs_diff, rel_diff


# -- writers ---------------------------------------------------------------------------------------------------------
def _write_pts(head: ExportHead, example: torch.Tensor, dst: Path, meta: dict[str, str]) -> None:
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


def _dynamic_shapes(dynamic_size: bool) -> dict[str, dict[int, Any]]:
    dims: dict[int, Any] = {0: torch.export.Dim.DYNAMIC}
    if dynamic_size:
        dims.update({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC})
    return {"x": dims}


def _write_pt2(head: ExportHead, example: torch.Tensor, dst: Path, meta: dict[str, str], dynamic_size: bool) -> None:
    program = torch.export.export(head, (example,), dynamic_shapes=_dynamic_shapes(dynamic_size))
    torch.export.save(program, dst, extra_files=meta)


def _write_onnx(
    head: ExportHead,
    example: torch.Tensor,
    dst: Path,
    meta: dict[str, str],
    output_names: list[str],
    dynamic_size: bool,
    opset: int | None,
) -> None:
    # The exporter narrates its steps on stdout and its optimiser logs every pass at INFO
    with contextlib.redirect_stdout(io.StringIO()), _quiet_loggers("onnx_ir", "onnxscript", "torch.onnx"):
        program = torch.onnx.export(
            head,
            (example,),
            dynamo=True,
            input_names=["x"],
            output_names=output_names,
            dynamic_shapes=_dynamic_shapes(dynamic_size),
            opset_version=opset,
            optimize=True,
            verbose=False,
        )
    program.model.metadata_props.update(meta)
    program.save(dst, external_data=False)


# -- reading back ----------------------------------------------------------------------------------------------------
def _exported_runner(path: Path, fmt: str, device: torch.device) -> Callable[[torch.Tensor], list[Any]]:
    if fmt == "onnx":
        session = load_onnx_session(path)
        return lambda x: session.run(None, {"x": x.detach().cpu().numpy()})
    module = _load_with_meta(path, fmt, device)[0]
    return lambda x: _as_list(module(x))


def _load_with_meta(path: Path, fmt: str, device: torch.device | str | None) -> tuple[nn.Module, dict[str, str]]:
    extra = dict.fromkeys(META_KEYS, "")
    if fmt == "pts":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location=device, _extra_files=extra)
    else:
        module = torch.export.load(path, extra_files=extra).module()
        if device is not None:
            module.to(device)
    return module, {k: v.decode() if isinstance(v, bytes) else v for k, v in extra.items()}


def sniff_export_format(path: str | os.PathLike) -> str:
    """``"pts"``, ``"pt2"`` or ``"onnx"``, from the file's contents (both torch formats are zip archives)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(path, "no such file")
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


def load_exported(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    inference: bool = False,
) -> tuple[nn.Module, Any]:
    """Load a ``.pts`` or ``.pt2`` export as ``(module, ModelInfo)``, like the reference's ``file_format`` argument.

    The module's ``forward`` returns the output chosen at export (``model_info.custom_config["export"]`` says which);
    it also carries ``task``, ``size`` and ``input_channels``. ``dtype`` casts the weights; graphs traced in float32
    may still compute parts in float32. ``.pt2`` modules cannot switch to eval mode, but were captured in it.
    """
    from ornis.loading import ModelInfo

    path = Path(path)
    fmt = sniff_export_format(path)
    if fmt == "onnx":
        raise CheckpointFormatError(path, "ONNX files run with onnxruntime: ornis.export.load_onnx_session(path)")
    try:
        module, extra = _load_with_meta(path, fmt, device)
    except (RuntimeError, OSError, ValueError) as e:
        raise CheckpointFormatError(path, f"cannot be loaded as a {fmt} export ({_first_line(e)})") from None
    meta = _parse_metadata(extra, path)
    if dtype is not None:
        module.to(dtype)
    if inference:
        if fmt == "pts":
            module.eval()
        for param in module.parameters():  # ScriptModules have no requires_grad_()
            param.requires_grad_(False)
    export = meta["export"]
    module.task = meta["task"]
    module.size = tuple(meta["signature"]["inputs"][0]["data_shape"][2:4])
    module.input_channels = int(meta["signature"]["inputs"][0]["data_shape"][1])
    if fmt == "pt2":
        # One program, one method: name it after what it computes, as the card API expects
        alias = {"embedding": "embedding", "features": "detection_features"}.get(export.get("output", ""))
        if alias is not None:
            setattr(module, alias, module.forward)
    info = ModelInfo(
        meta["class_to_idx"], meta["signature"], meta["rgb_stats"], {"export": export}, meta["network"] or None, path
    )
    return module, info


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
    return _parse_metadata(extra, path)


# -- helpers ---------------------------------------------------------------------------------------------------------
def _reserve_temporary(path: Path) -> Path:
    """A fresh temporary file beside ``path`` (so the final rename is atomic); a clear error if the folder cannot
    be created or written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # the real suffix last: torch.export.load warns about any other
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    except OSError as e:
        raise ExportError(f"{path}: the output folder {path.parent} cannot be written ({e.strerror or e})") from None
    os.close(fd)
    return Path(tmp)


def _require_onnx_tools() -> None:
    """ONNX export needs onnx + onnxscript (torch's exporter) and onnxruntime (the check); none is an ornis dependency."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(
            f"ONNX export needs {', '.join(missing)}, which ornis does not depend on: pip install {' '.join(missing)}"
        )


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


def _size_step(net: Encoder, patch_size: int | None) -> int:
    """The smallest change of input side the model accepts (the patch size for a plain ViT, else the total stride)."""
    return int(patch_size or getattr(net, "patch_size", 0) or 32)


def _as_list(out: Any) -> list[torch.Tensor]:
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]


def _metadata(
    net: Encoder,
    fmt: str,
    output: str,
    output_names: list[str],
    size: tuple[int, int],
    dynamic_size: bool,
    patch_size: int | None,
    class_to_idx: dict[str, int] | None,
    rgb_stats: dict[str, Any] | None,
    sample_outputs: list[torch.Tensor],
) -> dict[str, str]:
    from ornis import __version__
    from ornis.weights.checkpoint import DEFAULT_RGB_STATS

    # Batch (and, for a dynamic size, spatial) dimensions are written as 0, as in the reference's signatures
    spatial = (0, 0) if dynamic_size else size
    outputs = []
    for t in sample_outputs:
        shape = [0, *t.shape[1:]]
        if dynamic_size and t.ndim == 4:
            shape[2:] = [0, 0]
        outputs.append({"data_shape": [int(s) for s in shape]})
    signature = {"inputs": [{"data_shape": [0, net.input_channels, *spatial]}], "outputs": outputs}
    if dynamic_size:
        signature["inputs"][0]["data_shape"][2:] = list(size)  # the traced size, which get_size_from_signature reads
    export = {
        "format": fmt,
        "output": output,
        "output_names": output_names,
        "size": list(size),
        "dynamic_size": dynamic_size,
        "patch_size": patch_size,
        "num_classes": net.num_classes,
    }
    return {
        "ornis_version": __version__,
        "task": net.task,
        "class_to_idx": json.dumps(
            class_to_idx if class_to_idx is not None else {str(i): i for i in range(net.num_classes)}
        ),
        "signature": json.dumps(signature),
        "rgb_stats": json.dumps(rgb_stats or DEFAULT_RGB_STATS),
        "network": net.name,
        "export": json.dumps(export),
    }


def _parse_metadata(extra: dict[str, str], path: Path) -> dict[str, Any]:
    missing = [k for k in ("task", "class_to_idx", "signature", "rgb_stats") if not extra.get(k)]
    if missing:
        raise CheckpointFormatError(
            path, f"the export lacks metadata {', '.join(missing)} (not written by ornis export?)"
        )
    try:
        return {
            "ornis_version": extra.get("ornis_version", ""),
            "task": extra["task"],
            "class_to_idx": json.loads(extra["class_to_idx"]),
            "signature": json.loads(extra["signature"]),
            "rgb_stats": json.loads(extra["rgb_stats"]),
            "network": extra.get("network", ""),
            "export": json.loads(extra["export"]) if extra.get("export") else {},
        }
    except json.JSONDecodeError as e:
        raise CheckpointFormatError(path, f"the export's metadata is not valid JSON ({e})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else type(e).__name__
