"""The module an exported graph computes: the encoder cut at one output."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ornis.models.base import Encoder


class ExportHead(nn.Module):
    """The encoder cut at one output, as ``forward(x)``: what an exported graph computes. ``embedding``,
    ``classify`` and ``detection_features`` stay as methods so a TorchScript file keeps the card API."""

    def __init__(self, net: Encoder, output: str, patch_size: int | None = None) -> None:
        super().__init__()
        self.net = net
        self.output = output
        self.patch_size = patch_size

    def _kwargs(self) -> dict[str, int]:
        return {"patch_size": self.patch_size} if self.patch_size is not None else {}

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's embedding (B, D)."""
        return self.net.embedding(x, **self._kwargs())

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """The classifier's logits for an embedding."""
        return self.net.classify(embedding)

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The detection feature maps, one (B, C, h, w) per stage."""
        return self.net.detection_features(x, **self._kwargs())

    def forward(self, x: torch.Tensor) -> torch.Tensor | dict[str, torch.Tensor]:
        """The output chosen at export."""
        if self.output == "embedding":
            return self.embedding(x)
        if self.output == "logits":
            return self.classify(self.embedding(x))
        return self.detection_features(x)


def as_list(out: Any) -> list[torch.Tensor]:
    """A graph's output (one tensor, a tuple or list, or a dict of named maps) as a list of tensors, in order."""
    if isinstance(out, dict):
        return list(out.values())
    if isinstance(out, (list, tuple)):
        return list(out)
    return [out]
