"""``load_pretrained_model``: a published name or a local file in, a ready encoder and its metadata out."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch

from ornis.errors import CheckpointFormatError, OrnisError, StateDictMismatchError, UnknownModelError
from ornis.models import registry
from ornis.models.base import Encoder
from ornis.weights.checkpoint import Checkpoint, load_state, read_checkpoint
from ornis.weights.manifest import MANIFEST

CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".st")
EXPORT_FORMATS = ("pts", "pt2")


class ModelInfo(NamedTuple):
    """What a checkpoint says about its model, besides the weights (the reference's four fields first)."""

    class_to_idx: dict[str, int]
    signature: dict[str, Any]
    rgb_stats: dict[str, Any]
    custom_config: dict[str, Any] | None = None
    network: str | None = None
    path: Path | None = None


def is_checkpoint_path(name: str | os.PathLike) -> bool:
    """True when ``name`` names a file (a path object, a path with a separator, a checkpoint or export suffix, or an
    existing file) rather than a published model name."""
    if isinstance(name, os.PathLike):
        return True
    return os.sep in name or name.endswith(CHECKPOINT_SUFFIXES + tuple(f".{f}" for f in EXPORT_FORMATS)) or os.path.exists(name)


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
) -> tuple[Encoder, tuple[list[str], list[str]]]:
    """Build the checkpoint's architecture and load its weights. Returns the model and (missing, unexpected) keys,
    both empty unless ``strict=False``."""
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
) -> tuple[Encoder, ModelInfo]:
    """Load published weights by name (fetched into the cache if missing) or a local checkpoint file.

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
    """
    if isinstance(new_size, int):
        new_size = (new_size, new_size)
    path: Path
    if dst is not None and Path(dst).is_file():
        path = Path(dst)
    elif is_checkpoint_path(weights):
        path = Path(weights)
    elif str(weights) in MANIFEST:
        if network is None:
            network = MANIFEST[str(weights)].network
        if file_format in EXPORT_FORMATS:
            raise OrnisError(f"{weights}: exported {file_format} files are not published; export one with `ornis export`")
        from ornis.weights.cache import resolve_weights

        path = resolve_weights(
            str(weights), file_format or "pt", cache=cache_dir, offline=offline, base_url=base_url, progress=progress_bar
        )
    elif str(weights) in registry.list_models():
        raise OrnisError(
            f"{weights!r} is an architecture without published weights: ornis.build_model({str(weights)!r}) gives it "
            "random weights, or pass the path of a checkpoint"
        )
    else:
        raise UnknownModelError(str(weights), set(MANIFEST) | set(registry.list_models()), what="model")

    if file_format in EXPORT_FORMATS or path.suffix in (".pts", ".pt2"):
        if new_size is not None:
            raise ValueError("new_size cannot be used with exported (pts / pt2) models: their size is fixed at export")
        from ornis.export import load_exported

        return load_exported(path, device=device, dtype=dtype, inference=inference)

    ckpt = read_checkpoint(path)
    net, (missing, unexpected) = model_from_checkpoint(
        ckpt, network=network, path=path, config=custom_config, strict=strict
    )
    if new_size is not None:
        net.adjust_size(tuple(new_size))
    if device is not None:
        net.to(device)
    if dtype is not None:
        net.to(dtype)
    if inference:
        net.eval()
        net.requires_grad_(False)
    custom = dict(ckpt.config) if ckpt.config else None
    if missing or unexpected:
        custom = {**(custom or {}), "load_report": {"missing": missing, "unexpected": unexpected}}
    return net, ModelInfo(ckpt.class_to_idx, ckpt.signature, ckpt.rgb_stats, custom, net.name, path)
