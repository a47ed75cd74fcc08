"""Preprocessing, equal to the reference's inference preset.

The reference resizes to the *exact* (H, W) size (no aspect-ratio preservation) with bicubic antialiased
resampling, centre-crops (a no-op at ``center_crop=1.0``), scales to [0, 1] and normalises with the checkpoint's
``rgb_stats``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def classification_transform(
    size: int | Sequence[int], rgb_stats: dict[str, Any], center_crop: float = 1.0, simple_crop: bool = False
) -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised float32 (3, H, W) tensor, as the model was trained to see it.

    ``center_crop < 1`` resizes to ``size / center_crop`` first and crops the centre; ``simple_crop`` resizes the
    shorter side to cover that size, keeping the aspect ratio, instead of squashing.
    """
    h, w = _pair(size)
    base = (int(h / center_crop), int(w / center_crop))
    if simple_crop:
        resize: Any = v2.Resize(min(base), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        if base[0] != base[1]:
            raise ValueError("simple_crop needs a square size")
    else:
        resize = v2.Resize(base, interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
    return v2.Compose(
        [
            resize,
            v2.CenterCrop((h, w)),
            v2.PILToTensor(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(rgb_stats["mean"]), std=list(rgb_stats["std"])),
        ]
    )
