"""Data order and per-step randomness, both pure functions of (run seed, step), so a resumed run and a run split
over any number of ranks or loader workers see the same numbers.

The samples form an endless stream: epoch e is ``randperm(len(dataset))`` drawn from ``seed + e``, and step s takes
stream positions ``[s * batch_size, (s + 1) * batch_size)``; rank r takes its contiguous slice of that, micro-batch
m the m-th part of the slice. Every sample is fetched as ``dataset[SampleKey(index, seed)]`` where the seed is a
function of (run seed, stream position). Randomness inside a step (mixup, masks, drop-path) comes from the global
RNGs, reseeded from (seed, step, rank) before every step.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import numpy as np
import torch

from ornis.data.keys import SampleKey
from ornis.errors import OrnisError
from ornis.train.config import TrainConfig


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so nearby (seed, position) pairs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


def seed_step(seed: int, step: int, rank: int) -> None:
    """Reseed torch's, Python's and NumPy's global RNGs for one step of one rank."""
    s = mix_seed(seed, step, rank, 0x5EED)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


class StepBatches(torch.utils.data.Sampler):
    """Yields, for steps ``start..end-1``, this rank's micro-batches as lists of ``SampleKey`` (see the module
    docstring for the order)."""

    def __init__(self, size: int, cfg: TrainConfig, start: int, end: int, rank: int, world: int) -> None:
        per_rank, rest = divmod(cfg.batch_size, world * cfg.grad_accum)
        if rest or per_rank == 0:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be a multiple of ranks x grad_accum = {world} x {cfg.grad_accum}"
            )
        if size == 0:
            raise OrnisError("the training dataset is empty")
        self.size, self.cfg, self.start, self.end = size, cfg, start, end
        self.rank, self.world, self.micro = rank, world, per_rank
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            generator = torch.Generator().manual_seed(self.cfg.seed + epoch)
            self._perms = {epoch: torch.randperm(self.size, generator=generator)}
        return self._perms[epoch]

    def keys(self, step: int, micro: int) -> list[SampleKey]:
        """The samples of micro-batch ``micro`` of ``step`` on this rank."""
        first = step * self.cfg.batch_size + (self.rank * self.cfg.grad_accum + micro) * self.micro
        out = []
        for pos in range(first, first + self.micro):
            epoch, i = divmod(pos, self.size)
            out.append(SampleKey(int(self._perm(epoch)[i]), mix_seed(self.cfg.seed, pos)))
        return out

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in range(self.start, self.end):
            for micro in range(self.cfg.grad_accum):
                yield self.keys(step, micro)

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.cfg.grad_accum
