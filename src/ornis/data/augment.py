"""Training augmentations (torchvision v2) and the seeding that makes an augmented sample a pure function of its
``SampleKey``: the same crops whatever the number of ranks or loader workers, and exact resume."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from ornis.data.transforms import classification_transform


class seeded:
    """Run a block with torch's (CPU), Python's and NumPy's global RNGs seeded, restoring them afterwards
    (torchvision's random transforms draw from the global generators). Only the CPU generator is seeded: the
    transforms draw nowhere else, and ``torch.manual_seed`` would also reseed (and not restore) CUDA's, at about
    0.4 ms a call."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def __enter__(self) -> None:
        self._states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        torch.default_generator.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self._states[0])
        random.setstate(self._states[1])
        np.random.set_state(self._states[2])


def train_transform(
    size: int | Sequence[int],
    rgb_stats: dict[str, Any],
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    auto_augment: str | None = None,
    randaugment_magnitude: int = 9,
) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop, horizontal flip, optionally RandAugment (``"randaugment"``) or TrivialAugment
    (``"trivialaugment"``), then [0, 1] scaling and normalisation with ``rgb_stats``."""
    h, w = (size, size) if isinstance(size, int) else size
    steps: list[Any] = [v2.PILToTensor(), v2.RandomResizedCrop((h, w), scale=scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if auto_augment == "randaugment":
        steps.append(v2.RandAugment(magnitude=randaugment_magnitude))
    elif auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    elif auto_augment not in (None, "none"):
        raise ValueError(f"auto_augment must be 'randaugment', 'trivialaugment' or None, got {auto_augment!r}")
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(rgb_stats["mean"]), list(rgb_stats["std"]))]
    return v2.Compose(steps)


def eval_transform(size: int | Sequence[int], rgb_stats: dict[str, Any], center_crop: float = 1.0) -> Callable:
    """The inference preprocessing (``ornis.classification_transform``), for validation."""
    return classification_transform(size, rgb_stats, center_crop=center_crop)


class MixupCutmix:
    """Batch-level mixup / cutmix (torchvision v2, one of them per batch when both are on) with label smoothing:
    ``(images, labels) -> (images, soft targets)``; randomness from the global torch RNG (the loop seeds it)."""

    def __init__(
        self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, label_smoothing: float = 0.0
    ) -> None:
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        ops = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.op = None if not ops else ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    @property
    def active(self) -> bool:
        """Whether mixup or cutmix is on (else only one-hot targets and label smoothing)."""
        return self.op is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(images, targets)``: the batch mixed when ``active``, and soft targets (B, num_classes).

        ``images`` is (B, C, H, W) and ``labels`` (B,) class indices; label smoothing applies either way.
        """
        if self.op is not None:
            images, targets = self.op(images, labels)
        else:
            targets = F.one_hot(labels, self.num_classes).to(images.dtype)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return images, targets
