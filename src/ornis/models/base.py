"""What every ornis encoder offers, whatever its family.

``embedding`` and ``classify`` are the same path cut at two places (``forward == classify(embedding(x))``);
``detection_features`` gives the multi-scale maps a detector consumes; ``forward_intermediates`` is the one
feature API: chosen intermediate outputs as NCHW maps, the final patch tokens as an NCHW map, and the special
(class / register) tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


@dataclass
class Features:
    """Result of ``forward_intermediates``.

    maps
        Intermediate outputs as (B, C, h, w) maps, keyed ``block{i}`` (plain ViT, 0-based block index) or
        ``stage{i}`` (Hiera / HieraDet, 1-based stage), in the order asked for. They are taken before the final
        norm unless ``norm=True`` was asked for.
    patch_tokens
        The final patch tokens after the final norm, as a (B, C, h, w) map.
    cls_token
        The class token after the final norm, (B, C); ``None`` for families without one.
    register_tokens
        The register tokens after the final norm, (B, R, C); ``None`` where there are none.
    embedding
        What ``net.embedding(x)`` returns, (B, C).
    """

    maps: dict[str, torch.Tensor]
    patch_tokens: torch.Tensor
    embedding: torch.Tensor
    cls_token: torch.Tensor | None = None
    register_tokens: torch.Tensor | None = None


def normalize_indices(indices: int | Sequence[int] | None, count: int, what: str) -> list[int]:
    """``None`` -> the last; an int n -> the last n; a sequence -> those (negative counts from the end)."""
    if indices is None:
        return [count - 1]
    if isinstance(indices, int):
        if not 1 <= indices <= count:
            raise ValueError(f"asked for the last {indices} {what}s, but there are {count}")
        return list(range(count - indices, count))
    out = []
    for i in indices:
        j = i + count if i < 0 else i
        if not 0 <= j < count:
            raise ValueError(f"{what} index {i} is out of range for {count} {what}s")
        out.append(j)
    return out


class Encoder(nn.Module):
    """Base class of every family. Subclasses set the attributes below and implement the abstract methods."""

    family: ClassVar[str]
    task: ClassVar[str] = "image_classification"

    def __init__(self, config: Any, num_classes: int, size: tuple[int, int], name: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.name = name or self.family
        self.num_classes = num_classes
        self.size = (int(size[0]), int(size[1]))
        self.input_channels = 3
        self.embedding_size: int
        self.return_stages: list[str]
        self.return_channels: list[int]
        self.classifier: nn.Module

    # -- classification head -------------------------------------------------------------------------------
    def create_classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.embedding_size, num_classes) if num_classes > 0 else nn.Identity()

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head, e.g. before fine-tuning on a new label set (0 removes it)."""
        self.num_classes = num_classes
        self.classifier = self.create_classifier(num_classes)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.classifier(embedding)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return self.classify(self.embedding(x, **kwargs))

    # -- to implement ----------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False) -> Features:
        raise NotImplementedError

    def adjust_size(self, new_size: tuple[int, int]) -> None:
        """Re-base the model on another input size once, after the weights are loaded."""
        self.size = (int(new_size[0]), int(new_size[1]))

    # -- compatibility -------------------------------------------------------------------------------------------
    def set_dynamic_size(self, dynamic_size: bool = True) -> None:
        """Kept for the reference's API: ornis encoders always accept other input sizes."""

    def config_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.config)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, size={self.size}, num_classes={self.num_classes}"
