"""What the converters share: reading a foreign state dict safely, picking the registry variant for a set of
architecture facts, and writing the result."""

from __future__ import annotations

import dataclasses
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from ornis.errors import CheckpointFormatError
from ornis.models import registry
from ornis.weights.checkpoint import Checkpoint, make_signature, write_checkpoint

IMAGENET_RGB_STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def read_tensors(path: str | os.PathLike) -> Any:
    """The object in a ``.pt`` / ``.pth`` / ``.bin`` file (loaded with ``weights_only=True``) or the tensors of a
    ``.safetensors`` file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointFormatError(path, "no such file")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointFormatError(path, f"cannot be read as safetensors ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise CheckpointFormatError(
            path, f"refused to unpickle: it holds objects other than tensors ({first})"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointFormatError(path, f"cannot be read, truncated or corrupt ({e})") from None


def config_overrides(network: str, wanted: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``network``'s registered config that differ from ``wanted`` (stored in the checkpoint's
    ``config`` so the file rebuilds the exact architecture)."""
    base = registry.get_model_spec(network).config
    fields = {f.name for f in dataclasses.fields(base)}
    unknown = sorted(set(wanted) - fields)
    if unknown:
        raise ValueError(f"{network}: config fields {unknown} are not known to {type(base).__name__}")
    return {k: v for k, v in wanted.items() if getattr(base, k) != v}


def write_converted(
    state: dict[str, torch.Tensor],
    dst: str | os.PathLike,
    *,
    network: str,
    size: tuple[int, int],
    rgb_stats: dict[str, Any],
    config: dict[str, Any] | None,
) -> Path:
    """Write a converted encoder (no classifier) in the published format."""
    ckpt = Checkpoint(
        state={k: v.detach().contiguous() for k, v in state.items()},
        signature=make_signature(size, 0),
        class_to_idx={},
        rgb_stats=rgb_stats,
        task="image_classification",
        config=config or None,
        network=network,
    )
    return write_checkpoint(ckpt, dst)
