"""Hiera (Ryali et al., 2023): a hierarchical ViT with mask-unit attention in the first two stages, global attention
in the last two, and max-pooled queries between stages; optionally with the "absolute-window" position embedding
(Bolya et al., 2023: a background table interpolated to the token grid plus one window table tiled over it).

The token layout (unrolled, so pooling and mask-unit attention are reshapes) is ``hiera_layout``'s.

Input sides must be multiples of 32 (stem stride 4 times three 2x poolings; a mask unit is 8x8 tokens). Any such
size works per call; ``adjust_size`` re-bases the stored position table like the reference does.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ornis.models import onednn
from ornis.models.capabilities import MaskedTokenOmission, OmissionLayout, SinCosPositions, visible_cells
from ornis.models.hiera_layout import reroll, unroll
from ornis.models.hierarchical import Q_POOL, STEM_STRIDE, TOTAL_STRIDE, HierarchicalEncoder, check_size
from ornis.models.layers import DropPath, Mlp, drop_path_rates, interpolate_grid, run_stages, sincos_table
from ornis.models.registry import register_model

MASK_UNIT = 8  # tokens per side of a mask unit
Q_STRIDE = 2  # per side; a pooled query merges Q_STRIDE**2 tokens
MASK_UNIT_ATTN = (True, True, False, False)  # per stage
MAE_Q_POOL = 2  # query poolings in Hiera-MAE's encoder (its pretraining configs), one fewer than the backbone's


@dataclass(frozen=True)
class HieraConfig:
    """A Hiera variant: depths of the four stages, the first stage's width and heads, the position embedding."""

    # Field names are the reference's config keys, so a checkpoint's "config" applies as it is
    depths: tuple[int, ...]
    embed_dim: int
    num_heads: int
    abs_win_pos_embed: bool = True
    drop_path_rate: float = 0.1
    default_size: int = 224


@dataclass(frozen=True)
class BlockPlan:
    """One block's shape: widths in and out, heads, query pooling, mask-unit size, attention kind, drop-path."""

    dim: int
    dim_out: int
    heads: int
    q_stride: int  # tokens merged per pooled query (1: no pooling)
    window_tokens: int  # tokens in a mask unit after this block's pooling
    mask_unit_attn: bool
    drop_path: float


def block_plans(cfg: HieraConfig) -> list[list[BlockPlan]]:
    """Per stage, the plan of each block. The attention kind lags one block behind the stage change: the pooling
    block that opens a global-attention stage still attends within mask units (as in the paper's code)."""
    if len(cfg.depths) != 4:
        raise ValueError(f"Hiera needs 4 stage depths, got {cfg.depths}")
    rates = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
    stage_ends = [sum(cfg.depths[: i + 1]) - 1 for i in range(4)]
    pool_blocks = {end + 1 for end in stage_ends[:Q_POOL]}
    dim, heads, window, stage = cfg.embed_dim, cfg.num_heads, MASK_UNIT * MASK_UNIT, 0
    stages: list[list[BlockPlan]] = [[] for _ in cfg.depths]
    for i in range(sum(cfg.depths)):
        dim_out = dim
        mask_unit_attn = MASK_UNIT_ATTN[stage]
        if i - 1 in stage_ends:
            dim_out, heads, stage = dim * 2, heads * 2, stage + 1
            if i in pool_blocks:
                window //= Q_STRIDE * Q_STRIDE
        q_stride = Q_STRIDE * Q_STRIDE if i in pool_blocks else 1
        stages[stage].append(BlockPlan(dim, dim_out, heads, q_stride, window, mask_unit_attn, rates[i]))
        dim = dim_out
    return stages


class MaskUnitAttention(nn.Module):
    """Attention within each mask unit (or over all tokens), with the queries max-pooled first where the block
    opens a stage. Every (head, mask unit) pair is one batch entry of a single 4-D SDPA call."""

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        if plan.dim_out % plan.heads:
            raise ValueError(f"attention width {plan.dim_out} is not divisible by {plan.heads} heads")
        self.heads = plan.heads
        self.head_dim = plan.dim_out // plan.heads
        self.dim_out = plan.dim_out
        self.q_stride = plan.q_stride
        self.window_tokens = plan.window_tokens
        self.mask_unit_attn = plan.mask_unit_attn
        self.qkv = nn.Linear(plan.dim, 3 * plan.dim_out)
        self.proj = nn.Linear(plan.dim_out, plan.dim_out)

    def forward(self, x: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """(B, N, dim) unrolled tokens -> (B, N / q_stride, dim_out); ``pool=False`` skips the query pooling
        (Hiera-MAE's encoder, which pools once fewer): (B, N, dim_out)."""
        B, N, _ = x.shape
        # The window index is the fastest-varying one in the unrolled layout; under token masking N counts only
        # the kept mask units, and so does `windows`
        windows = N // (self.q_stride * self.window_tokens) if self.mask_unit_attn else 1
        T = N // windows
        qkv = onednn.linear(self.qkv, x).view(B, T, windows, 3, self.heads, self.head_dim)
        # One copy into (3, B, heads * windows, T, head_dim): 4-D, so the flash / memory-efficient kernels apply
        q, k, v = qkv.permute(3, 0, 4, 2, 1, 5).reshape(3, B, self.heads * windows, T, self.head_dim).unbind(0)
        if self.q_stride > 1 and pool:
            q = q.view(B, self.heads * windows, self.q_stride, T // self.q_stride, self.head_dim).amax(dim=2)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.view(B, self.heads, windows, -1, self.head_dim).permute(0, 3, 2, 1, 4).reshape(B, -1, self.dim_out)
        return onednn.linear(self.proj, x)


class HieraBlock(nn.Module):
    """Pre-norm attention + MLP block; a stage-opening block projects and max-pools its shortcut too."""

    def __init__(self, plan: BlockPlan) -> None:
        super().__init__()
        self.q_stride = plan.q_stride
        self.norm1 = nn.LayerNorm(plan.dim, eps=1e-6)
        self.proj = nn.Linear(plan.dim, plan.dim_out) if plan.dim != plan.dim_out else None
        self.attn = MaskUnitAttention(plan)
        self.norm2 = nn.LayerNorm(plan.dim_out, eps=1e-6)
        self.mlp = Mlp(plan.dim_out, 4 * plan.dim_out)
        self.drop_path = DropPath(plan.drop_path)

    def forward(self, x: torch.Tensor, pool: bool = True) -> torch.Tensor:
        """(B, N, dim) -> (B, N / q_stride, dim_out); ``pool=False``: no pooling, (B, N, dim_out)."""
        x_norm = self.norm1(x)
        if self.proj is not None:
            x = onednn.linear(self.proj, x_norm)
            if pool:
                x = x.view(x.shape[0], self.q_stride, -1, x.shape[-1]).amax(dim=1)  # the shortcut's max-pool
        x = x + self.drop_path(self.attn(x_norm, pool))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class AvgTokens(nn.Module):
    """The mean over the token axis: (B, N, C) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, C) -> (B, C)."""
        return x.mean(dim=1)


class Hiera(HierarchicalEncoder, MaskedTokenOmission, SinCosPositions):
    """Hiera over the unrolled token layout of the module docstring. Masked image modelling leaves out whole mask
    units (32 x 32 pixels): ``masked_omission`` (the capability: Hiera-MAE's encoder), ``masked_encoding`` and
    ``masked_encoding_omission`` (the reference's API: the published layout)."""

    family = "hiera"
    default_mask_ratio = 0.6  # Hiera's paper (and the reference) hide 0.6 of the mask units
    mim_positions = "random"  # Hiera-MAE learns its absolute table from the architecture's own init

    def __init__(self, config: HieraConfig, num_classes: int, size: tuple[int, int], name: str | None = None) -> None:
        super().__init__(config, num_classes, size, name)
        cfg = config
        grid = self.token_grid
        if cfg.abs_win_pos_embed:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.embed_dim, self.size[0] // 16, self.size[1] // 16))
            self.pos_embed_win = nn.Parameter(torch.zeros(1, cfg.embed_dim, MASK_UNIT, MASK_UNIT))
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], cfg.embed_dim))
            self.pos_embed_win = None

        plans = block_plans(cfg)
        self.body = nn.Sequential(
            OrderedDict(
                (f"stage{i + 1}", nn.Sequential(*(HieraBlock(p) for p in stage))) for i, stage in enumerate(plans)
            )
        )
        final_dim = plans[-1][-1].dim_out
        self.features = nn.Sequential(AvgTokens(), nn.LayerNorm(final_dim, eps=1e-6))

        self.embedding_size = final_dim
        self.return_channels = [stage[-1].dim_out for stage in plans]
        self.classifier = self.create_classifier(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # The reference's init: small positive biases on linear layers and norms, a near-zero head
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.constant_(m.bias, 0.02)
            elif isinstance(m, nn.LayerNorm):
                nn.init.constant_(m.bias, 0.02)
                nn.init.ones_(m.weight)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.pos_embed_win is not None:
            nn.init.trunc_normal_(self.pos_embed_win, std=0.02)
        if isinstance(self.classifier, nn.Linear):
            with torch.no_grad():
                self.classifier.weight.mul_(0.001)
                self.classifier.bias.mul_(0.001)

    def init_sincos_positions(self) -> None:
        """The absolute table (the background one of abs-win, on its own grid) as the 2-D sine-cosine table; the
        window's zero."""
        with torch.no_grad():
            if self.pos_embed_win is None:
                self.pos_embed.copy_(sincos_table(self.token_grid, self.pos_embed.shape[-1])[None])
                return
            _, dim, h, w = self.pos_embed.shape
            self.pos_embed.copy_(sincos_table((h, w), dim).T.reshape(1, dim, h, w))
            self.pos_embed_win.zero_()

    @property
    def token_grid(self) -> tuple[int, int]:
        """The stem's token grid at the model's size."""
        return (self.size[0] // STEM_STRIDE, self.size[1] // STEM_STRIDE)

    @property
    def mask_spatial_shape(self) -> tuple[int, int]:
        """The mask-unit grid at the model's size (what MIM masks are drawn on)."""
        return (self.size[0] // TOTAL_STRIDE, self.size[1] // TOTAL_STRIDE)

    @property
    def final_norm(self) -> nn.Module:
        """The LayerNorm after the token average."""
        return self.features[1]

    # -- tokens ------------------------------------------------------------------------------------------------
    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a token grid, as a (1, C, Y, X) map."""
        if self.pos_embed_win is None:
            table = self.pos_embed
            if grid != self.token_grid:
                table = interpolate_grid(table, self.token_grid, grid, antialias=True)
            return table.transpose(1, 2).reshape(1, -1, *grid)
        window = self.pos_embed_win.tile(1, 1, grid[0] // MASK_UNIT, grid[1] // MASK_UNIT)
        background = F.interpolate(self.pos_embed.float(), size=grid, mode="bicubic", antialias=True)
        return background.to(window.dtype) + window

    def _tokens(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Stem, position embedding, unroll; with ``keep`` (B, K) sorted mask-unit indices, only those units'
        tokens (and the image outside the others is zeroed before the stem, as the reference does)."""
        check_size(self.name, x.shape[-2:])
        B, _, H, W = x.shape
        units = (H // TOTAL_STRIDE, W // TOTAL_STRIDE)
        if keep is not None:
            unit_mask = torch.zeros(B, units[0] * units[1], dtype=x.dtype, device=x.device).scatter_(1, keep, 1.0)
            pixel_mask = unit_mask.view(B, 1, units[0], 1, units[1], 1).expand(
                -1, -1, -1, TOTAL_STRIDE, -1, TOTAL_STRIDE
            )
            x = x * pixel_mask.reshape(B, 1, H, W)
        x = self.stem(x)
        grid = (x.shape[-2], x.shape[-1])
        tokens = unroll(x + self._pos_embed(grid))
        if keep is not None:
            per_unit = tokens.shape[1] // (units[0] * units[1])
            tokens = tokens.view(B, per_unit, units[0] * units[1], -1)
            index = keep[:, None, :, None].expand(-1, per_unit, -1, tokens.shape[-1])
            tokens = tokens.gather(2, index).reshape(B, -1, tokens.shape[-1])
        return tokens

    @staticmethod
    def _levels_left(stage: int, pools: int = Q_POOL) -> int:
        """The unrolled levels left after stage ``stage`` (0-based) when ``pools`` stage-opening poolings run."""
        return Q_POOL - min(stage, pools)

    def _stage_map(self, tokens: torch.Tensor, stage: int, input_hw: tuple[int, int]) -> torch.Tensor:
        units = (input_hw[0] // TOTAL_STRIDE, input_hw[1] // TOTAL_STRIDE)
        return reroll(tokens, self._levels_left(stage), units)

    # -- token omission (masked image modelling) ---------------------------------------------------------------
    def _kept_unit_stages(
        self, x: torch.Tensor, keep: torch.Tensor, stages: Sequence[int], pools: int = Q_POOL
    ) -> list[torch.Tensor]:
        """The kept units' outputs of ``stages`` as (B, K, m, m, C) patches; ``keep`` (B, K) ascending. ``pools``:
        how many of the stage-opening query poolings run (the first ones; Hiera-MAE's encoder runs one fewer)."""
        body = ([partial(blk, pool=i <= pools) for blk in stage] for i, stage in enumerate(self.body))
        _, kept = run_stages(body, self._tokens(x, keep), max(stages), stages, self.grad_checkpointing)
        return [reroll(kept[i], self._levels_left(i, pools), None) for i in stages]

    def _mae_stages(self) -> list[int]:
        """The stages Hiera-MAE's encoder returns: those before the last pooling it does, and the last (the
        stages between have the last one's resolution)."""
        return [*range(MAE_Q_POOL), len(self.body) - 1]

    def omission_layout(self, size: tuple[int, int]) -> OmissionLayout:
        """Cells are the 8 x 8-token (32-pixel) mask units. The outputs are Hiera-MAE's (``masked_omission``): the
        first two stages and the last, a unit being 8 x 8, 4 x 4 and 2 x 2 positions of them."""
        grid = (int(size[0]) // TOTAL_STRIDE, int(size[1]) // TOTAL_STRIDE)
        stages = self._mae_stages()
        sides = tuple(2 ** self._levels_left(i, MAE_Q_POOL) for i in stages)
        return OmissionLayout(grid, TOTAL_STRIDE, MASK_UNIT, tuple(self.return_channels[i] for i in stages), sides)

    def masked_omission(
        self, x: torch.Tensor, hidden: torch.Tensor, num_hidden: int | None = None
    ) -> list[torch.Tensor]:
        """Hiera-MAE's encoder (Ryali et al.; ``q_pool=2`` in its pretraining configs) over the visible mask units:
        the same blocks and weights, with the query pooling that opens the last stage left out, so the last stage
        runs at stride 16 (2 x 2 positions a unit, each predicting 16 x 16 pixels) and the backbone is the
        published one afterwards. Returns the outputs of ``omission_layout``'s stages as (B, K, m, m, C) patches,
        see ``MaskedTokenOmission``."""
        return self._kept_unit_stages(x, visible_cells(hidden, num_hidden), self._mae_stages(), MAE_Q_POOL)

    def omission_unused_modules(self) -> list[nn.Module]:
        """The pooled embedding's final norm: the masked path returns stage outputs, unpooled."""
        return [self.features]

    def masked_encoding_omission(
        self,
        x: torch.Tensor,
        ids_keep: torch.Tensor | None = None,
        return_all_features: bool = False,
        return_keys: Literal["all", "tokens", "embedding"] = "tokens",
    ) -> dict[str, torch.Tensor]:
        """The reference's API: encode only the mask units in ``ids_keep`` (B, K) (indices into the row-major
        mask-unit grid, H/32 x W/32, any order): ``{"tokens": (B, K, C), "embedding": (B, C)}`` as ``return_keys``
        asks. Tokens come in increasing mask-unit order, like the reference's."""
        if return_all_features:
            raise ValueError("return_all_features is not supported by Hiera")
        keep = None if ids_keep is None else ids_keep.sort(dim=1).values
        tokens = self._run_stages(self._tokens(x, keep), len(self.body) - 1)[0]
        result: dict[str, torch.Tensor] = {}
        if return_keys in ("all", "tokens"):
            result["tokens"] = tokens
        if return_keys in ("all", "embedding"):
            result["embedding"] = self.features(tokens)
        return result

    def masked_encoding(
        self, x: torch.Tensor, mask: torch.Tensor, num_masked: int | None = None
    ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The reference's MAE-Hiera encoder pass. ``mask`` (B, units): 1 = masked (dropped), the same count in
        every row (``num_masked``, if known on the host: then no host sync and static shapes under
        ``torch.compile``). Returns, for each stage in ``return_stages``, the kept units' tokens as (B, K, m, m, C)
        patches, and the boolean keep mask (B, units), as the reference does."""
        keep = visible_cells(mask, num_masked)
        return self._kept_unit_stages(x, keep, self._returned_stages()), (1 - mask).bool()

    def adjust_size(self, new_size: tuple[int, int]) -> None:
        """Re-base the stored position table on another input size (bicubic with antialias, as the reference)."""
        new_size = (int(new_size[0]), int(new_size[1]))
        if new_size == self.size:
            return
        check_size(self.name, new_size)
        with torch.no_grad():
            if self.pos_embed_win is not None:
                table = F.interpolate(
                    self.pos_embed.float(), size=(new_size[0] // 16, new_size[1] // 16), mode="bicubic", antialias=True
                ).to(self.pos_embed.dtype)
            else:
                new_grid = (new_size[0] // STEM_STRIDE, new_size[1] // STEM_STRIDE)
                table = interpolate_grid(self.pos_embed, self.token_grid, new_grid, antialias=True)
        self.pos_embed = nn.Parameter(table, requires_grad=self.pos_embed.requires_grad)
        super().adjust_size(new_size)


# (depths, embed_dim, num_heads, drop_path_rate) as the reference registers them
_SIZES = {
    "tiny": ((1, 2, 7, 2), 96, 1, 0.1),
    "small": ((1, 2, 11, 2), 96, 1, 0.1),
    "base": ((2, 3, 16, 3), 96, 1, 0.1),
    "base_plus": ((2, 3, 16, 3), 112, 2, 0.1),
    "large": ((2, 6, 36, 4), 144, 2, 0.2),
    "huge": ((2, 6, 36, 4), 256, 4, 0.3),
}


def _register_family() -> None:
    for size, (depths, dim, heads, dpr) in _SIZES.items():
        for abswin, prefix in ((False, "hiera"), (True, "hiera_abswin")):
            cfg = HieraConfig(
                depths=depths, embed_dim=dim, num_heads=heads, abs_win_pos_embed=abswin, drop_path_rate=dpr
            )
            register_model(f"{prefix}_{size}", Hiera, cfg)


_register_family()
