"""SAM 2 / SAM 2.1 image-encoder trunks (Ravi et al., 2024) -> ``hieradet_*`` checkpoints.

A SAM 2 checkpoint (``sam2.1_hiera_small.pt``) is a dict whose ``model`` entry is the whole model's state dict; the
trunk's tensors are the ones under ``image_encoder.trunk.``. Names map one to one: ``patch_embed.proj`` ->
``stem.proj``, ``pos_embed_window`` -> ``pos_embed_win``, and the flat ``blocks.N`` -> ``body.stage<S>.<j>`` (a new
stage starts at each block with a ``proj``, the width-changing shortcut), with ``mlp.layers.{0,1}`` ->
``mlp.{0,3}``. The trunk has no final norm; ornis's ``features.0`` norm (used only by ``embedding()``) is written
as the identity-initialised LayerNorm the reference's converted model carries, and ``detection_features`` do not
touch it.

What the tensors do not record (heads, global-attention blocks, window sizes) comes from the registered
``hieradet_<size>`` variant whose depths and width match, which are SAM 2's own configs.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from ornis.errors import CheckpointFormatError
from ornis.models import registry
from ornis.models.hierarchical import TOTAL_STRIDE
from ornis.weights.checkpoint import check_destination
from ornis.weights.convert.common import (
    IMAGENET_RGB_STATS,
    config_overrides,
    foreign_layout,
    read_tensors,
    write_converted,
)

TRUNK_PREFIX = "image_encoder.trunk."
SAM2_SIZE = 1024  # SAM 2 runs its image encoder at 1024 x 1024
SAM2_RGB_STATS = IMAGENET_RGB_STATS  # SAM 2 normalises with ImageNet's mean and std (sam2/utils/transforms.py)


def convert_sam2(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    network: str | None = None,
    size: int = SAM2_SIZE,
) -> Path:
    """Convert a SAM 2 checkpoint's image-encoder trunk into ``dst`` in the published format.

    ``network`` picks the ``hieradet_*`` variant (default: the one whose depths and width match the trunk);
    ``size`` is the input size recorded in the file (SAM 2's 1024; HieraDet runs at any multiple of 32).
    """
    src = Path(src)
    check_destination(dst)
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % TOTAL_STRIDE:
        raise ValueError(f"size must be a positive multiple of {TOTAL_STRIDE} (HieraDet's stride), found {size!r}")
    if network is not None:
        registry.get_model_spec(network)  # a misspelt name fails before the source is read
    obj = read_tensors(src)
    model = obj.get("model", obj) if isinstance(obj, dict) else None
    if not isinstance(model, dict):
        raise CheckpointFormatError(src, "expected a SAM 2 checkpoint: a dict with a 'model' state dict")
    with foreign_layout(src, "SAM 2 checkpoint"):
        trunk = trunk_state(model, path=src)
        state, depths = trunk_to_ornis(trunk, path=src)
        embed_dim = trunk["patch_embed.proj.weight"].shape[0]
        global_pos_size = tuple(trunk["pos_embed"].shape[-2:])
        first_window = trunk["pos_embed_window"].shape[-1]
    if network is None:
        network = match_variant(depths, embed_dim, path=src)
    spec = registry.get_model_spec(network)
    wanted = {"depths": depths, "embed_dim": embed_dim, "global_pos_size": global_pos_size}
    if first_window != spec.config.window_spec[0]:
        wanted["window_spec"] = (first_window, *spec.config.window_spec[1:])
    overrides = config_overrides(network, wanted)
    return write_converted(
        state, dst, network=network, size=(size, size), rgb_stats=SAM2_RGB_STATS, config=overrides, source=src
    )


def trunk_state(model: dict[str, torch.Tensor], path: Path | None = None) -> dict[str, torch.Tensor]:
    """The trunk's tensors, prefix removed (a bare trunk state dict is accepted as it is)."""
    trunk = {k[len(TRUNK_PREFIX) :]: v for k, v in model.items() if k.startswith(TRUNK_PREFIX)}
    if not trunk and "patch_embed.proj.weight" in model:
        trunk = dict(model)
    if "patch_embed.proj.weight" not in trunk or "pos_embed" not in trunk or "pos_embed_window" not in trunk:
        sample = ", ".join(list(model)[:6])
        raise CheckpointFormatError(
            path, f"no SAM 2 image-encoder trunk: expected keys under {TRUNK_PREFIX!r} (found {sample}, ...)"
        )
    return trunk


def trunk_to_ornis(
    trunk: dict[str, torch.Tensor], path: Path | None = None
) -> tuple[dict[str, torch.Tensor], tuple[int, ...]]:
    """Rename a SAM 2 trunk's tensors to ornis's HieraDet keys; also returns the blocks per stage."""
    num_blocks = 1 + max(int(m.group(1)) for k in trunk if (m := re.match(r"blocks\.(\d+)\.", k)))
    stage_starts = [0] + [i for i in range(1, num_blocks) if f"blocks.{i}.proj.weight" in trunk]
    depths = tuple(b - a for a, b in zip(stage_starts, stage_starts[1:] + [num_blocks]))
    where = {}  # block index -> (stage number, index within the stage)
    for s, (a, n) in enumerate(zip(stage_starts, depths), start=1):
        for j in range(n):
            where[a + j] = (s, j)

    out = {
        "pos_embed": trunk["pos_embed"],
        "pos_embed_win": trunk["pos_embed_window"],
        "stem.proj.weight": trunk["patch_embed.proj.weight"],
        "stem.proj.bias": trunk["patch_embed.proj.bias"],
    }
    used = {"pos_embed", "pos_embed_window", "patch_embed.proj.weight", "patch_embed.proj.bias"}
    renames = {"mlp.layers.0.": "mlp.0.", "mlp.layers.1.": "mlp.3."}
    for key, value in trunk.items():
        m = re.match(r"blocks\.(\d+)\.(.+)", key)
        if not m:
            continue
        s, j = where[int(m.group(1))]
        rest = m.group(2)
        for old, new in renames.items():
            if rest.startswith(old):
                rest = new + rest[len(old) :]
        out[f"body.stage{s}.{j}.{rest}"] = value
        used.add(key)
    unused = sorted(set(trunk) - used)
    if unused:
        raise CheckpointFormatError(
            path, f"{len(unused)} trunk key(s) have no HieraDet counterpart: {', '.join(unused[:8])}"
        )
    width = trunk[f"blocks.{num_blocks - 1}.norm2.weight"].shape[0]
    out["features.0.weight"] = torch.ones(width)
    out["features.0.bias"] = torch.zeros(width)
    return out, depths


def match_variant(depths: tuple[int, ...], embed_dim: int, path: Path | None = None) -> str:
    """The fixed-window ``hieradet_*`` variant (SAM 2's configs) with these depths and width."""
    found = []
    for name in registry.list_models("hieradet_*"):
        cfg = registry.get_model_spec(name).config
        if name.startswith("hieradet_d_"):
            continue  # dynamic-window variants are not SAM 2's
        if tuple(cfg.depths) == tuple(depths) and cfg.embed_dim == embed_dim:
            found.append(name)
    if len(found) != 1:
        raise CheckpointFormatError(
            path,
            f"trunk with depths {list(depths)} and width {embed_dim} matches "
            f"{'no' if not found else 'several'} hieradet variant(s) {found}; pass network=<name>",
        )
    return found[0]
