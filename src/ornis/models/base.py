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
    """Base class of every family. Subclasses set the attributes below and implement the abstract methods.

    Besides the feature API, an encoder declares the facts training recipes need, so that a recipe asks the model
    and never tests its family (timm's ``no_weight_decay`` / ``group_matcher``, Birder's ``stem_width`` /
    ``max_stride``): its strides and stem width, the parameters without weight decay, its repeated ``blocks`` (for
    FSDP wrapping and activation checkpointing) and the layer group of every parameter (layer-wise lr decay).
    Masked forwards are capabilities (``ornis.models.capabilities``).
    """

    family: ClassVar[str]
    task: ClassVar[str] = "image_classification"
    # Top-level attributes holding what runs before the first block (layer group 0): patch embedding, tokens,
    # position embeddings
    stem_names: ClassVar[tuple[str, ...]] = ()

    def __init__(self, config: Any, num_classes: int, size: tuple[int, int], name: str | None = None) -> None:
        super().__init__()
        self.config = config
        self.name = name or self.family
        self.num_classes = num_classes
        self.size = (int(size[0]), int(size[1]))
        self.input_channels = 3
        self.grad_checkpointing = False
        self.embedding_size: int
        self.return_stages: list[str]
        self.return_channels: list[int]
        self.classifier: nn.Module
        self.stem_stride: int  # pixels per stem token (the patch size of a ViT)
        self.stem_width: int  # channels of the stem's tokens (what a mask token replaces)
        self.max_stride: int  # pixels per position of the coarsest feature map

    # -- classification head -------------------------------------------------------------------------------
    def create_classifier(self, num_classes: int) -> nn.Module:
        """A linear head from the embedding to ``num_classes`` logits (the identity for 0), drawn from a truncated
        normal of std 0.02 with a zero bias. Not zero: a zero head sends the backbone a gradient along the mean
        of its embeddings only, which the final norm removes, so a backbone whose embeddings start alike (a random
        init) gets no gradient at all (measured: a from-scratch ViT stayed at ln 10 for 200 steps)."""
        if num_classes <= 0:
            return nn.Identity()
        head = nn.Linear(self.embedding_size, num_classes)
        nn.init.trunc_normal_(head.weight, std=0.02)
        nn.init.zeros_(head.bias)
        return head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head, e.g. before fine-tuning on a new label set (0 removes it)."""
        self.num_classes = num_classes
        self.classifier = self.create_classifier(num_classes)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits from an embedding (the head alone)."""
        return self.classifier(embedding)

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Logits: ``classify(embedding(x))``."""
        return self.classify(self.embedding(x, **kwargs))

    # -- to implement ----------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final tokens (layout per family)."""
        raise NotImplementedError

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled embedding, (B, ``embedding_size``)."""
        raise NotImplementedError

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{stage name: (B, C, h, w)}`` for the stages in ``return_stages``."""
        raise NotImplementedError

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False
    ) -> Features:
        """Chosen intermediate outputs and the final tokens as ``Features``."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        """The repeated blocks, in the order they run (FSDP shards and checkpointing recompute one at a time)."""
        raise NotImplementedError

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters that are positions or learned tokens, not weights: decaying them towards 0 only
        hurts (ViT, MAE, DINOv2). Biases and norms (1-D) are left to the optimizer's own rule."""
        return set()

    def adjust_size(self, new_size: tuple[int, int]) -> None:
        """Re-base the model on another input size once, after the weights are loaded."""
        self.size = (int(new_size[0]), int(new_size[1]))

    # -- training facts -------------------------------------------------------------------------------------------
    @property
    def patch_size_range(self) -> tuple[int, int] | None:
        """(smallest, largest) patch size a FlexiViT-style model may be run with per call; None for a fixed stem."""
        return None

    @property
    def num_layer_groups(self) -> int:
        """Layer groups for layer-wise lr decay: the stem, one per block, and everything after the last block."""
        return len(self.blocks()) + 2

    def layer_id(self, param_name: str) -> int:
        """The layer group of a parameter: 0 for the stem (``stem_names``), i + 1 inside block i, and
        ``num_layer_groups - 1`` for everything after the last block (final norm, head)."""
        if param_name.split(".", 1)[0] in self.stem_names:
            return 0
        index = {id(blk): i for i, blk in enumerate(self.blocks())}
        for prefix, module in self.named_modules():
            if id(module) in index and param_name.startswith(prefix + "."):
                return index[id(module)] + 1
        return self.num_layer_groups - 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them (memory for compute)."""
        self.grad_checkpointing = enable

    # -- compatibility -------------------------------------------------------------------------------------------
    def set_dynamic_size(self, dynamic_size: bool = True) -> None:
        """Kept for the reference's API: ornis encoders always accept other input sizes."""

    def config_dict(self) -> dict[str, Any]:
        """The config as a plain dictionary."""
        return dataclasses.asdict(self.config)

    def extra_repr(self) -> str:
        """Name, size and classes in ``repr(net)``."""
        return f"name={self.name!r}, size={self.size}, num_classes={self.num_classes}"
