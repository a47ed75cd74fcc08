"""What Hiera and HieraDet share: the 7x7 / stride-4 convolutional stem, four stages of blocks with three 2x
poolings between them (total stride 32), the input-size rule, and everything that runs stages: the forward,
``detection_features``, ``forward_intermediates``, gradient checkpointing and the training facts.

A family adds its blocks (``body``: ``stage1``..``stage4``), its pooled-embedding head (``features``), its token
layout (``_tokens``: stem + position embedding; ``_stage_map``: a stage's output as an NCHW map) and
``final_norm``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ornis.models.base import Encoder, Features, normalize_indices
from ornis.models.layers import run_stages

STEM_STRIDE = 4
Q_POOL = 3  # 2x2 poolings, at the starts of stages 2, 3 and 4
TOTAL_STRIDE = STEM_STRIDE * 2**Q_POOL  # 32


def check_size(name: str, size: Sequence[int]) -> None:
    """Raise ``ValueError`` unless both sides of ``size`` are positive multiples of 32."""
    H, W = int(size[0]), int(size[1])
    if H % TOTAL_STRIDE or W % TOTAL_STRIDE or H <= 0 or W <= 0:
        raise ValueError(f"{name}: input size {H}x{W} is not a positive multiple of {TOTAL_STRIDE} on both sides")


class ConvStem(nn.Module):
    """7x7 / stride 4 convolution (``stem.proj``)."""

    def __init__(self, in_channels: int, dim: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=7, stride=STEM_STRIDE, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, dim, H/4, W/4)."""
        return self.proj(x)


class HierarchicalEncoder(Encoder):
    """Base of the four-stage families. Builds the stem (first, so checkpoints keep their key order) and holds
    what runs the stages; the family builds ``pos_embed`` (and ``pos_embed_win``), ``body`` and ``features``."""

    stem_names = ("stem", "pos_embed", "pos_embed_win")

    def __init__(self, config: Any, num_classes: int, size: tuple[int, int], name: str | None = None) -> None:
        super().__init__(config, num_classes, size, name)
        check_size(self.name, self.size)
        self.stem = ConvStem(3, config.embed_dim)
        self.stem_stride, self.stem_width, self.max_stride = STEM_STRIDE, config.embed_dim, TOTAL_STRIDE
        self.return_stages = ["stage1", "stage2", "stage3", "stage4"]
        self.body: nn.Sequential
        self.features: nn.Sequential

    # -- what the family provides ----------------------------------------------------------------------------------
    @property
    def final_norm(self) -> nn.Module:
        """The LayerNorm of the pooled embedding, applied per position where a normed map is asked for."""
        raise NotImplementedError

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Stem and position embedding, in the family's layout."""
        raise NotImplementedError

    def _stage_map(self, tokens: torch.Tensor, stage: int, input_hw: tuple[int, int]) -> torch.Tensor:
        """Stage ``stage``'s (0-based) output as a (B, C, h, w) map, for an input of ``input_hw``."""
        raise NotImplementedError

    # -- stages ---------------------------------------------------------------------------------------------------
    def blocks(self) -> list[nn.Module]:
        """Every block of every stage, in order."""
        return [blk for stage in self.body.children() for blk in stage]

    def no_weight_decay(self) -> set[str]:
        """The position tables."""
        return {n for n in ("pos_embed", "pos_embed_win") if getattr(self, n, None) is not None}

    def _run_stages(
        self, x: torch.Tensor, last: int, keep: Sequence[int] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        return run_stages(self.body.children(), x, last, keep, self.grad_checkpointing)

    def _stage_names(self) -> list[str]:
        return [f"stage{i + 1}" for i in range(len(self.body))]

    def _returned_stages(self) -> list[int]:
        return [i for i, n in enumerate(self._stage_names()) if n in self.return_stages]

    # -- public API ------------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's output before the final norm, in the family's layout (see its module docstring)."""
        return self._run_stages(self._tokens(x), len(self.body) - 1)[0]

    def embedding(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage pooled and normed (``features``)."""
        return self.features(self.forward_features(x))

    def detection_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{stage name: (B, C, H/s, W/s)}`` for the stages in ``self.return_stages`` (later stages not run)."""
        wanted = self._returned_stages()
        if not wanted:
            return {}
        hw = (x.shape[-2], x.shape[-1])
        _, kept = self._run_stages(self._tokens(x), max(wanted), wanted)
        names = self._stage_names()
        return {names[i]: self._stage_map(kept[i], i, hw) for i in wanted}

    def forward_intermediates(
        self, x: torch.Tensor, indices: int | Sequence[int] | None = None, norm: bool = False
    ) -> Features:
        """Chosen stages' outputs as NCHW maps keyed ``stage{i + 1}`` (``indices`` are 0-based stage positions,
        negative from the end; an int n means the last n stages). ``norm=True`` applies the final LayerNorm to the
        last stage's map (the only one of its width). ``patch_tokens``: the last stage with the final norm applied
        per position."""
        stages = normalize_indices(indices, len(self.body), "stage")
        last = len(self.body) - 1
        hw = (x.shape[-2], x.shape[-1])
        final, kept = self._run_stages(self._tokens(x), last, stages)
        maps = {
            f"stage{i + 1}": self._stage_map(self.final_norm(kept[i]) if norm and i == last else kept[i], i, hw)
            for i in stages
        }
        patch_tokens = self._stage_map(self.final_norm(final), last, hw)
        return Features(maps=maps, patch_tokens=patch_tokens, embedding=self.features(final))
