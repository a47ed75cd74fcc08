"""How a training loop asks a dataset for a sample."""

from __future__ import annotations

from typing import NamedTuple


class SampleKey(NamedTuple):
    """Which sample, and the seed its random augmentation must use (so augmentations do not depend on the number of
    ranks or data-loader workers)."""

    index: int
    seed: int
