"""Typed records that flow through a worker: a decoded ``Batch`` from the DataLoader, the model's ``Outputs`` for it,
and the ``Row`` / ``FailedSample`` each sample becomes in its shard."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import numpy as np
import torch

from ornis.data.datasets import Sample, collate_samples


class SampleRef(NamedTuple):
    """A sample that decoded: where it is in the plan, what its row is called, the decoded image's size."""

    shard: int
    index: int
    key: str
    width: int
    height: int


class FailedSample(NamedTuple):
    """A sample that could not be used, and why; one line of the errors file."""

    shard: int
    index: int
    key: str
    reason: str

    def record(self) -> dict[str, Any]:
        """The errors-file line: ``{"path", "reason", "shard", "index"}``."""
        return {"path": self.key, "reason": self.reason, "shard": self.shard, "index": self.index}


@dataclass(frozen=True)
class Outputs:
    """The model's results as host arrays, for a batch (first axis: its rows) or for one row. A field the job does
    not ask for is ``None``: ``embedding`` (embed), ``probabilities`` and ``label_ids`` (classify, top k, best first),
    ``features`` (the ``features=STAGE`` map)."""

    embedding: np.ndarray | None = None
    probabilities: np.ndarray | None = None
    label_ids: np.ndarray | None = None
    features: np.ndarray | None = None

    def row(self, j: int) -> Outputs:
        """The results of row ``j``."""
        return Outputs(*(None if a is None else a[j] for a in self._arrays()))

    def _arrays(self) -> tuple[np.ndarray | None, ...]:
        return (self.embedding, self.probabilities, self.label_ids, self.features)


class Row(NamedTuple):
    """One good image of a shard: its index in the shard's plan (the row order), its name, size and results."""

    index: int
    key: str
    width: int
    height: int
    outputs: Outputs


@dataclass(frozen=True)
class Batch:
    """What the DataLoader hands the model loop. ``samples`` are the good images: first those decoded in the workers
    (``pixels``, uint8 or float, one image a sample), then the JPEGs left to decode on the device (``jpeg``, their
    bytes). ``failed`` are the samples that could not be used; ``count`` is all of them, good and bad."""

    pixels: torch.Tensor | None
    jpeg: list[torch.Tensor]
    samples: list[SampleRef]
    failed: list[FailedSample] = field(default_factory=list)
    decode_s: float = 0.0  # CPU seconds its samples took to decode, summed over the workers
    count: int = 0

    @property
    def decoded_count(self) -> int:
        """How many of ``samples`` come as ``pixels`` (the rest are ``jpeg``)."""
        return len(self.samples) - len(self.jpeg)

    def without(self, dropped: dict[int, str]) -> Batch:
        """This batch with the samples at positions ``dropped`` moved to ``failed``, each with its reason."""
        kept = [s for j, s in enumerate(self.samples) if j not in dropped]
        lost = [FailedSample(s.shard, s.index, s.key, dropped[j]) for j, s in enumerate(self.samples) if j in dropped]
        return replace(self, samples=kept, failed=[*self.failed, *lost])

    def pin_memory(self) -> Batch:
        """The batch with its tensors in pinned memory (the DataLoader calls this with ``pin_memory=True``)."""
        pixels = self.pixels.pin_memory() if self.pixels is not None else None
        return replace(self, pixels=pixels, jpeg=[j.pin_memory() for j in self.jpeg])


def collate_batch(samples: list[Sample]) -> Batch:
    """The DataLoader's ``collate_fn``: ``ornis.data.datasets.collate_samples`` as a typed ``Batch``."""
    c = collate_samples(samples)
    refs = [SampleRef(*r) for r in zip(c["shard"], c["index"], c["key"], c["width"], c["height"])]
    return Batch(
        pixels=c["pixels"],
        jpeg=list(c["jpeg"]),
        samples=refs,
        failed=[FailedSample(*e) for e in c["errors"]],
        decode_s=c["decode_s"],
        count=c["count"],
    )
