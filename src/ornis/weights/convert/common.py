"""What the converters share: reading a foreign state dict safely, the config overrides a converted encoder needs
(computed by ``ornis.weights.checkpoint``, the one place that compares a config with its registered variant), and
writing the result as a checked checkpoint."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ornis.errors import CheckpointFormatError, OrnisError, first_line
from ornis.models import registry
from ornis.models.base import Encoder
from ornis.weights.checkpoint import (
    Checkpoint,
    config_changes,
    load_state,
    load_torch_file,
    make_signature,
    require_regular_file,
    write_checkpoint,
)

IMAGENET_RGB_STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def read_tensors(path: str | os.PathLike) -> Any:
    """The object in a ``.pt`` / ``.pth`` / ``.bin`` file (loaded with ``weights_only=True``) or the tensors of a
    ``.safetensors`` file."""
    path = Path(path)
    require_regular_file(path)
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointFormatError(path, f"cannot be read as safetensors ({first_line(e)})") from None
    return load_torch_file(path)


@contextmanager
def foreign_layout(path: Path, what: str) -> Iterator[None]:
    """Inside the block, a source that is not the ``what`` the converter expects (a key it needs is absent, a
    value is not a tensor, a shape has too few dimensions) is a ``CheckpointFormatError`` naming ``path``, not
    whatever Python raised while mapping it; ornis's own errors pass through as they are."""
    try:
        yield
    except OrnisError:
        raise
    except (KeyError, IndexError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointFormatError(
            path, f"not a {what} this converter can read ({type(e).__name__}: {first_line(e)})"
        ) from None


def config_overrides(network: str, wanted: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``wanted`` that differ from ``network``'s registered config (stored in the checkpoint's
    ``config`` so the file rebuilds the exact architecture). ValueError for a field the config does not have."""
    config = registry.apply_overrides(registry.get_model_spec(network).config, wanted)
    return config_changes(network, config) or {}


def write_converted(
    state: dict[str, torch.Tensor],
    dst: str | os.PathLike,
    *,
    network: str,
    size: tuple[int, int],
    rgb_stats: dict[str, Any],
    config: dict[str, Any] | None,
    source: Path | None = None,
) -> Path:
    """Write a converted encoder (no classifier) in the published format, after checking that ``state`` fits
    ``network`` with ``config`` (StateDictMismatchError naming ``source`` otherwise), so that a bad conversion
    fails here rather than at the first load."""
    net = _fitted(state, network, size, config, source)
    ckpt = Checkpoint(
        # The tensors as converted, not the model's copy: a converter keeps the upstream dtype
        state={k: v.detach().contiguous() for k, v in state.items()},
        signature=make_signature(size, 0),
        class_to_idx={},
        rgb_stats=rgb_stats,
        task=net.task,
        config=config_changes(network, net.config),
        network=network,
    )
    return write_checkpoint(ckpt, dst)


def _fitted(
    state: dict[str, torch.Tensor],
    network: str,
    size: tuple[int, int],
    config: dict[str, Any] | None,
    source: Path | None,
) -> Encoder:
    """``network`` built on the meta device (no memory, no init) with ``state`` adopted, strictly."""
    spec = registry.get_model_spec(network)
    with torch.device("meta"):
        net = spec.cls(registry.apply_overrides(spec.config, config), num_classes=0, size=size, name=network)
    load_state(net, state, strict=True, path=source, assign=True)
    return net
