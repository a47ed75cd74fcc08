"""``load_pretrained_model``: a published name or a local file in, a ready encoder and its metadata out.

What a name means is decided in one place, ``resolve_model_name``: a path (or a name that looks like one) is a file,
a manifest name is published weights, a registry name is an architecture without weights, and anything else is an
``UnknownModelError`` suggesting names from both sets. ``load_pretrained_model``, ``ornis models info`` and the
batch runner all ask it, so they agree.

Exported files (``.pts``, ``.pt2``) are read by ``ornis.export``, which sits above this module in the layer order
(models <- weights <- loading <- export): it registers its reader here with ``register_export_reader`` when it is
imported (``import ornis`` does), so this module never imports it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from torch import nn

from ornis.errors import CheckpointFormatError, OrnisError, StateDictMismatchError, UnknownModelError
from ornis.models import registry
from ornis.models.base import Encoder
from ornis.models.precision import check_precision, prepare_for_inference
from ornis.weights.cache import resolve_weights
from ornis.weights.checkpoint import Checkpoint, LoadReport, load_state, read_checkpoint
from ornis.weights.manifest import DEFAULT_FILE_FORMAT, MANIFEST, PretrainedWeights

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".st")
EXPORT_FORMATS = ("pts", "pt2")  # exported files load_pretrained_model opens (ONNX runs with onnxruntime)


class ModelInfo(NamedTuple):
    """What a checkpoint says about its model, besides the weights (the reference's four fields first)."""

    class_to_idx: dict[str, int]
    signature: dict[str, Any]
    rgb_stats: dict[str, Any]
    custom_config: dict[str, Any] | None = None
    network: str | None = None
    path: Path | None = None


# -- what a name means -------------------------------------------------------------------------------------------
def is_checkpoint_path(name: str | os.PathLike) -> bool:
    """True when ``name`` names a file (a path object, a path with a separator, a checkpoint or export suffix, or an
    existing file) rather than a published model name."""
    if isinstance(name, os.PathLike):
        return True
    suffixes = CHECKPOINT_SUFFIXES + tuple(f".{f}" for f in EXPORT_FORMATS)
    return os.sep in name or name.endswith(suffixes) or os.path.exists(name)


@dataclass(frozen=True)
class ModelSource:
    """What a model name stands for: a local ``file``, published ``weights``, or a bare ``architecture``."""

    name: str
    kind: Literal["file", "weights", "architecture"]
    path: Path | None = None  # kind "file"
    weights: PretrainedWeights | None = None  # kind "weights"
    network: str | None = None  # the architecture, where the name alone says it


def check_model_name(name: Any, argument: str = "weights") -> None:
    """``TypeError`` naming ``argument`` unless ``name`` is a model name or path (a non-empty ``str`` or an
    ``os.PathLike``): ``None``, a number or ``bytes`` would otherwise fail deep inside with a message about
    something else."""
    if isinstance(name, os.PathLike):
        return
    if not isinstance(name, str):
        raise TypeError(
            f"{argument} must be a published model name or a checkpoint path (str or os.PathLike), "
            f"found {type(name).__name__} {name!r:.60}"
        )
    if not name.strip():
        raise ValueError(
            f"{argument} is empty; expected a published model name (ornis.list_pretrained_models()) or a "
            "checkpoint path"
        )


def resolve_model_name(name: str | os.PathLike) -> ModelSource:
    """What ``name`` means, the rule every entry point follows: a path is a file (present or not), a manifest name
    is published weights, a registry name is an architecture; otherwise ``UnknownModelError`` suggesting the
    closest names among both published weights and architectures. ``TypeError`` when ``name`` is neither a string
    nor a path."""
    check_model_name(name, "name")
    if is_checkpoint_path(name):
        return ModelSource(os.fspath(name), "file", path=Path(name))
    name = str(name)
    if name in MANIFEST:
        return ModelSource(name, "weights", weights=MANIFEST[name], network=MANIFEST[name].network)
    if name in registry.list_models():
        return ModelSource(name, "architecture", network=name)
    raise UnknownModelError(name, set(MANIFEST) | set(registry.list_models()), what="model")


def model_file(
    source: ModelSource,
    file_format: str | None = None,
    *,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    base_url: str | None = None,
    progress: bool | None = None,
) -> Path:
    """The local file ``source`` loads from: the file itself, or published weights' verified file (fetched into the
    cache when missing). An architecture has none: OrnisError saying how to get a model of it."""
    if source.kind == "file":
        assert source.path is not None
        return source.path
    if source.kind == "architecture":
        raise OrnisError(
            f"{source.name!r} is an architecture without published weights: ornis.build_model({source.name!r}) "
            "gives it random weights, or pass the path of a checkpoint"
        )
    if file_format in EXPORT_FORMATS:
        raise OrnisError(
            f"{source.name}: exported {file_format} files are not published; export one with `ornis export`"
        )
    return resolve_weights(
        source.name,
        file_format or DEFAULT_FILE_FORMAT,
        cache=cache_dir,
        offline=offline,
        base_url=base_url,
        progress=progress,
    )


# -- exported files ----------------------------------------------------------------------------------------------
ExportReader = Callable[..., tuple[nn.Module, ModelInfo]]
"""``reader(path, *, device, dtype, inference) -> (module, ModelInfo)`` for one export format."""

_EXPORT_READERS: dict[str, ExportReader] = {}


def register_export_reader(file_format: str, reader: ExportReader) -> None:
    """Let ``load_pretrained_model`` open exported files of ``file_format`` (one of ``EXPORT_FORMATS``) with
    ``reader``; ``ornis.export`` registers its own when imported."""
    if file_format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {file_format!r}; expected one of {', '.join(EXPORT_FORMATS)}")
    _EXPORT_READERS[file_format] = reader


def _export_format(path: Path, file_format: str | None) -> str | None:
    """The export format ``path`` is to be read as (from ``file_format`` or its suffix), or None for a checkpoint."""
    if file_format in EXPORT_FORMATS:
        return file_format
    suffix = path.suffix.lstrip(".")
    return suffix if suffix in EXPORT_FORMATS else None


# -- checkpoints -------------------------------------------------------------------------------------------------
def identify_network(ckpt: Checkpoint, path: Path | None, network: str | None = None) -> str:
    """The registry architecture a checkpoint is for: the caller's word, the file's own ``network`` entry, its file
    name (``<network>_<tag>.pt``, the reference's naming), or failing those its tensor shapes."""
    if network is not None:
        registry.get_model_spec(network)
        return network
    if ckpt.network and ckpt.network in registry.list_models():
        return ckpt.network
    if path is not None:
        stem = path.name.split(".")[0]
        if stem in MANIFEST:
            return MANIFEST[stem].network
        matches = [n for n in registry.list_models() if stem == n or stem.startswith(n + "_")]
        if matches:
            return max(matches, key=len)
    matches = _match_by_shapes(ckpt)
    if len(matches) == 1 or (matches and _same_computation(matches)):
        return matches[0]
    hint = f"; candidates with these shapes: {', '.join(matches)}" if matches else ""
    raise CheckpointFormatError(
        path, f"cannot tell which architecture this checkpoint is for; pass network=<name> (ornis.list_models()){hint}"
    )


def _same_computation(names: list[str]) -> bool:
    """True when the candidates differ only in training-time settings (e.g. a ViT and its FlexiViT twin)."""
    training_only = {"flexi", "default_size", "min_patch_size", "max_patch_size", "drop_path_rate"}

    def inference_fields(name: str) -> dict[str, Any]:
        cfg = registry.get_model_spec(name).config
        return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in training_only}

    first = inference_fields(names[0])
    return all(inference_fields(n) == first for n in names[1:])


def _match_by_shapes(ckpt: Checkpoint) -> list[str]:
    """The architectures whose state dict has exactly the checkpoint's keys and shapes (built on the meta device)."""
    shapes = {k: tuple(v.shape) for k, v in ckpt.state.items()}
    found = []
    for name in sorted(registry.list_models(), key=lambda n: (n.startswith("flexi"), n)):
        spec = registry.get_model_spec(name)
        try:
            with torch.device("meta"):
                net = spec.cls(spec.config, num_classes=ckpt.num_classes, size=ckpt.size, name=name)
        except (ValueError, RuntimeError):
            continue
        own = net.state_dict()
        if own.keys() == shapes.keys() and all(tuple(t.shape) == shapes[k] for k, t in own.items()):
            found.append(name)
    return found


def model_from_checkpoint(
    ckpt: Checkpoint,
    *,
    network: str | None = None,
    path: Path | None = None,
    config: dict[str, Any] | None = None,
    strict: bool = True,
) -> tuple[Encoder, LoadReport]:
    """Build the checkpoint's architecture and load its weights. Returns the model and the keys a non-strict load
    left out (none unless ``strict=False``)."""
    name = identify_network(ckpt, path, network)
    spec = registry.get_model_spec(name)
    overrides = {**(ckpt.config or {}), **(config or {})}
    try:
        cfg = registry.apply_overrides(spec.config, overrides)
    except ValueError as e:
        raise CheckpointFormatError(path, str(e)) from None
    try:
        # Build on the meta device and adopt the checkpoint's tensors: no time spent on a random init
        with torch.device("meta"):
            net = spec.cls(cfg, num_classes=ckpt.num_classes, size=ckpt.size, name=name)
        report = load_state(net, ckpt.state, strict=strict, path=path, assign=True)
    except (ValueError, RuntimeError) as e:
        if isinstance(e, StateDictMismatchError):
            raise
        raise CheckpointFormatError(path, f"does not fit architecture {name!r}: {e}") from None
    if any(t.is_meta for t in [*net.parameters(), *net.buffers()]):
        # Non-strict load left some tensors unset: build for real so they get their initial values
        net = spec.cls(cfg, num_classes=ckpt.num_classes, size=ckpt.size, name=name)
        report = load_state(net, ckpt.state, strict=False, path=path)
    return net, report


def load_pretrained_model(
    weights: str | os.PathLike,
    *,
    inference: bool = False,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    new_size: int | tuple[int, int] | None = None,
    file_format: str | None = None,
    network: str | None = None,
    custom_config: dict[str, Any] | None = None,
    strict: bool = True,
    dst: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    base_url: str | None = None,
    progress_bar: bool | None = None,
    precision: str | None = None,
    compile: bool = False,
) -> tuple[Encoder | nn.Module, ModelInfo]:
    """Load published weights by name (fetched into the cache if missing) or a local checkpoint file.

    Returns ``(model, model_info)``: the model is an ``Encoder``, except for an exported ``.pts`` / ``.pt2`` file,
    which gives an ``ornis.export.ExportedModel`` (the fixed graph and the card API's methods it has).

    weights
        A name from ``ornis.list_pretrained_models()``, or a path to a ``.pt`` / ``.safetensors`` checkpoint in the
        published format (or ``.pts`` / ``.pt2`` exports).
    inference
        Put the model in eval mode with gradients off.
    new_size
        Re-base the model on another input size after loading (position embeddings resized once).
    file_format
        ``"pt"`` (default) or ``"safetensors"`` for published weights; ``"pts"`` / ``"pt2"`` for exported models.
    network
        The architecture of a local file, when neither the file nor its name says it.
    strict
        With ``False``, tensors that fit are loaded and the missing/unexpected keys are returned in
        ``model_info.custom_config["load_report"]`` instead of raising.
    dst, cache_dir, offline, base_url, progress_bar
        Where the file is, or goes (``dst`` a file, ``cache_dir`` the cache folder), no network, a mirror, a
        download progress bar (default: on when stderr is a terminal).
    precision, compile
        The inference fast path (``ornis.models.precision``): ``"fp32"``, ``"bf16"`` (autocast) or ``"int8"``
        (dynamic quantisation of the linear layers, CPU), optionally ``torch.compile``-d. Gives an
        ``InferenceModel`` with the same methods and float32 outputs; its accuracy against fp32 is
        ``ornis.models.precision.PRECISION_ACCURACY``.
    """
    check_model_name(weights)
    if dst is not None:
        check_model_name(dst, "dst")
    if dst is not None and Path(dst).is_file():
        source = ModelSource(os.fspath(dst), "file", path=Path(dst))
    else:
        source = resolve_model_name(weights)
    path = model_file(
        source, file_format, cache_dir=cache_dir, offline=offline, base_url=base_url, progress=progress_bar
    )
    if (export_format := _export_format(path, file_format)) is not None:
        if new_size is not None:
            raise ValueError("new_size cannot be used with exported (pts / pt2) models: their size is fixed at export")
        if export_format not in _EXPORT_READERS:
            raise OrnisError(f"{path}: no reader for {export_format} files is registered (import ornis.export)")
        return _EXPORT_READERS[export_format](path, device=device, dtype=dtype, inference=inference)

    ckpt = read_checkpoint(path)
    net, report = model_from_checkpoint(
        ckpt, network=network or source.network, path=path, config=custom_config, strict=strict
    )
    _prepare(net, new_size=new_size, device=device, dtype=dtype, inference=inference)
    if precision is not None:
        check_precision(precision)
    custom = dict(ckpt.config) if ckpt.config else None
    if report.missing or report.unexpected:
        custom = {**(custom or {}), "load_report": report._asdict()}
    info = ModelInfo(ckpt.class_to_idx, ckpt.signature, ckpt.rgb_stats, custom, net.name, path)
    if (precision is not None and precision != "fp32") or compile:
        return prepare_for_inference(net, precision or "fp32", compile=compile, inplace=True), info
    return net, info


def _prepare(
    net: Encoder,
    *,
    new_size: int | tuple[int, int] | None,
    device: torch.device | str | None,
    dtype: torch.dtype | None,
    inference: bool,
) -> None:
    """Re-base on ``new_size``, move, cast and (``inference``) freeze a loaded encoder, in place."""
    if new_size is not None:
        net.adjust_size((new_size, new_size) if isinstance(new_size, int) else tuple(new_size))
    if device is not None:
        net.to(device)
    if dtype is not None:
        net.to(dtype)
    if inference:
        net.eval()
        net.requires_grad_(False)
