"""HieraDet, the SAM 2 image-encoder trunk (Ravi et al., 2024), and its dynamic-window-size variant.

Tokens stay a channels-last (B, H, W, C) map throughout. Each block attends within non-overlapping windows (zero
padding the map up to a multiple of the window, as SAM 2 does) or, for the blocks in ``global_att_blocks`` and
windows of size 0, over the whole map; the first block of stages 2-4 max-pools its queries and its shortcut 2x2.
Position embedding: a background table bicubically interpolated to the token grid plus the first stage's window
table tiled over it, computed from the input's size on every call.

Window sizes. ``window_spec`` gives one per stage, and a stage's value also applies to the first (pooling) block of
the next stage. ``hieradet_*`` uses SAM 2's fixed ``[8, 4, 14, 7]``, so at 1024 the 64x64 third-stage map is padded
to 70x70. ``hieradet_d_*`` ("dynamic") uses ``[8, 4, 0, 0]``: stages 3 and 4 attend globally, so nothing depends
on the input size. A negative value -d means ``min(size) // d`` of the model's size, fixed when the model is built
or re-based with ``adjust_size`` (the reference's rule; no registered variant uses it).

Input sides must be multiples of 32; any such size works per call.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ornis.models import onednn
from ornis.models.capabilities import MaskedTokenRetention, RetainedTokens, SinCosPositions
from ornis.models.hierarchical import Q_POOL, STEM_STRIDE, TOTAL_STRIDE, HierarchicalEncoder, check_size
from ornis.models.layers import DropPath, Mlp, drop_path_rates, sincos_table
from ornis.models.registry import register_model


@dataclass(frozen=True)
class HieraDetConfig:
    """A HieraDet variant: stage depths, first-stage width and heads, the background position table's size, the
    globally attending blocks and the per-stage windows."""

    # Field names are the reference's config keys, so a checkpoint's "config" applies as it is
    depths: tuple[int, ...]
    embed_dim: int
    num_heads: int
    global_pos_size: tuple[int, int]
    global_att_blocks: tuple[int, ...]
    window_spec: tuple[int, int, int, int]
    drop_path_rate: float = 0.1
    default_size: int = 224


def window_sizes(cfg: HieraDetConfig, size: tuple[int, int]) -> list[int]:
    """Each block's attention window (0: global) at model size ``size``; the spec lags a block behind the stage."""
    stage_ends = [sum(cfg.depths[: i + 1]) - 1 for i in range(len(cfg.depths))]
    out, stage = [], 0
    for i in range(sum(cfg.depths)):
        window = cfg.window_spec[stage]
        if i in cfg.global_att_blocks:
            window = 0
        elif window < 0:
            window = min(size) // -window
        out.append(window)
        if i - 1 in stage_ends:
            stage += 1
    return out


def pool_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 / stride 2 max-pool of a channels-last (B, H, W, C) map with even sides.

    max_pool2d on the channels-last NCHW view, not ``amax`` over a 6-D view: measured on 2 CPU cores at batch 8,
    the amax reduction took 67 ms of hieradet_small's 940 ms forward against ~10 ms for max_pool2d."""
    return F.max_pool2d(x.permute(0, 3, 1, 2), kernel_size=2, stride=2).permute(0, 2, 3, 1)


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * windows, window, window, C), zero-padding the bottom / right; also the padded size."""
    B, H, W, C = x.shape
    pad_h, pad_w = -H % window, -W % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    Hp, Wp = H + pad_h, W + pad_w
    x = x.view(B, Hp // window, window, Wp // window, window, C).transpose(2, 3)
    return x.reshape(-1, window, window, C), (Hp, Wp)


def window_unpartition(windows: torch.Tensor, batch: int, padded: tuple[int, int], hw: tuple[int, int]) -> torch.Tensor:
    """Undo ``window_partition``: (B * windows, w, w, C) -> (B, H, W, C), the padding cut off."""
    window = windows.shape[1]
    Hp, Wp = padded
    x = windows.view(batch, Hp // window, Wp // window, window, window, -1).transpose(2, 3)
    x = x.reshape(batch, Hp, Wp, -1)
    return x[:, : hw[0], : hw[1]] if (Hp, Wp) != tuple(hw) else x


class MultiScaleAttention(nn.Module):
    """Self-attention over a (B, H, W, C) map (a batch of windows or the whole map); ``q_pool`` max-pools the
    queries 2x2 first, so the output is (B, H/2, W/2, C_out)."""

    def __init__(self, dim: int, dim_out: int, num_heads: int, q_pool: bool) -> None:
        super().__init__()
        if dim_out % num_heads:
            raise ValueError(f"attention width {dim_out} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim_out // num_heads
        self.q_pool = q_pool
        self.qkv = nn.Linear(dim, dim_out * 3)
        self.proj = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) -> (B, H', W', dim_out), H' = H / 2 with query pooling."""
        B, H, W, _ = x.shape
        # Views of one (B, H, W, 3, heads, head_dim) tensor: no copies before SDPA
        q, k, v = onednn.linear(self.qkv, x).view(B, H, W, 3, self.num_heads, self.head_dim).unbind(3)
        if self.q_pool:
            q = q.reshape(B, H, W, -1)
            q = pool_2x2(q).view(B, H // 2, W // 2, self.num_heads, self.head_dim)
            H, W = H // 2, W // 2
        q = q.reshape(B, H * W, self.num_heads, self.head_dim).transpose(1, 2)
        k = k.reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        v = v.reshape(B, -1, self.num_heads, self.head_dim).transpose(1, 2)
        x = F.scaled_dot_product_attention(q, k, v)
        return onednn.linear(self.proj, x.transpose(1, 2).reshape(B, H, W, -1))


class MultiScaleBlock(nn.Module):
    """Pre-norm windowed (or global) attention + MLP; a stage-opening block pools its queries and its shortcut."""

    def __init__(
        self, dim: int, dim_out: int, num_heads: int, drop_path: float, q_pool: bool, window_size: int
    ) -> None:
        super().__init__()
        if q_pool and window_size % 2:
            raise ValueError(f"a query-pooling block needs an even window, got {window_size}")
        self.q_pool = q_pool
        self.window_size = window_size  # 0: global attention; reset by HieraDet.adjust_size
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.proj = nn.Linear(dim, dim_out) if dim != dim_out else None
        self.attn = MultiScaleAttention(dim, dim_out, num_heads, q_pool)
        self.norm2 = nn.LayerNorm(dim_out, eps=1e-6)
        self.mlp = Mlp(dim_out, 4 * dim_out)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) -> (B, H', W', dim_out)."""
        x_norm = self.norm1(x)
        shortcut = x
        if self.proj is not None:
            shortcut = onednn.linear(self.proj, x_norm)
            if self.q_pool:
                shortcut = pool_2x2(shortcut)
        if self.window_size > 0:
            windows, padded = window_partition(x_norm, self.window_size)
            out = self.attn(windows)
            if self.q_pool:
                padded = (padded[0] // 2, padded[1] // 2)
            out = window_unpartition(out, x.shape[0], padded, (shortcut.shape[1], shortcut.shape[2]))
        else:
            out = self.attn(x_norm)
        x = shortcut + self.drop_path(out)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class SpatialMean(nn.Module):
    """The mean over positions of a channels-last map: (B, H, W, C) -> (B, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, C) -> (B, C)."""
        return x.mean(dim=(1, 2))


class HieraDet(HierarchicalEncoder, MaskedTokenRetention, SinCosPositions):
    """SAM 2's trunk over channels-last maps (module docstring). iBOT / DINOv2 masking keeps every position and
    blanks the masked 32 x 32-pixel cells: ``masked_retention`` (the capability) and ``masked_encoding_retention``
    (the reference's API)."""

    family = "hieradet"

    def __init__(
        self, config: HieraDetConfig, num_classes: int, size: tuple[int, int], name: str | None = None
    ) -> None:
        super().__init__(config, num_classes, size, name)
        cfg = config
        if len(cfg.depths) != 4 or len(cfg.window_spec) != 4:
            raise ValueError(
                f"{self.name}: HieraDet needs 4 stages, got depths {cfg.depths}, windows {cfg.window_spec}"
            )
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.embed_dim, *cfg.global_pos_size))
        self.pos_embed_win = nn.Parameter(torch.zeros(1, cfg.embed_dim, cfg.window_spec[0], cfg.window_spec[0]))

        rates = drop_path_rates(cfg.drop_path_rate, sum(cfg.depths))
        windows = window_sizes(cfg, self.size)
        stages: OrderedDict[str, nn.Module] = OrderedDict()
        dim, heads, i = cfg.embed_dim, cfg.num_heads, 0
        self.return_channels = []
        for s, depth in enumerate(cfg.depths):
            blocks = []
            for j in range(depth):
                opens_stage = j == 0 and 0 < s <= Q_POOL
                dim_out, heads = (dim * 2, heads * 2) if opens_stage else (dim, heads)
                blocks.append(MultiScaleBlock(dim, dim_out, heads, rates[i], opens_stage, windows[i]))
                dim, i = dim_out, i + 1
            stages[f"stage{s + 1}"] = nn.Sequential(*blocks)
            self.return_channels.append(dim)
        self.body = nn.Sequential(stages)
        self.features = nn.Sequential(nn.LayerNorm(dim, eps=1e-6), SpatialMean())

        self.embedding_size = dim
        self.classifier = self.create_classifier(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # For training from scratch, as SAM 2 and timm's Hiera initialise: truncated normal (std 0.02) weights,
        # zero biases, identity norms. Skipped on the meta device, where loading a checkpoint builds the model
        # (every tensor is then replaced, and the init would only cost time)
        if self.pos_embed.is_meta:
            return
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed_win, std=0.02)

    def init_sincos_positions(self) -> None:
        """The background table (interpolated to the stem grid) as the 2-D sine-cosine table; the window's zero."""
        _, dim, h, w = self.pos_embed.shape
        with torch.no_grad():
            self.pos_embed.copy_(sincos_table((h, w), dim).T.reshape(1, dim, h, w))
            self.pos_embed_win.zero_()

    @property
    def final_norm(self) -> nn.Module:
        """The LayerNorm before the spatial mean."""
        return self.features[0]

    # -- tokens ------------------------------------------------------------------------------------------------
    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """(1, Y, X, C) position embeddings for a stem grid."""
        window = self.pos_embed_win
        background = F.interpolate(self.pos_embed.float(), size=grid, mode="bicubic").to(window.dtype)
        pos = background + window.tile(1, 1, grid[0] // window.shape[2], grid[1] // window.shape[3])
        return pos.permute(0, 2, 3, 1)

    def _tokens(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, mask_token: torch.Tensor | None = None
    ) -> torch.Tensor:
        check_size(self.name, x.shape[-2:])
        x = self.stem(x).permute(0, 2, 3, 1)  # channels-last view of the conv's output
        if mask is not None:
            # mask (B, H/32 * W/32), 1 = masked: each entry covers 8x8 stem tokens
            B, Y, X, _ = x.shape
            f = TOTAL_STRIDE // STEM_STRIDE
            m = mask.view(B, Y // f, 1, X // f, 1).expand(-1, -1, f, -1, f).reshape(B, Y, X, 1).to(x.dtype)
            x = x * (1.0 - m) + (mask_token.expand(B, Y, X, -1) * m if mask_token is not None else 0.0)
        return x + self._pos_embed((x.shape[1], x.shape[2]))

    def _stage_map(self, tokens: torch.Tensor, stage: int, input_hw: tuple[int, int]) -> torch.Tensor:
        # A permuted view of the channels-last tensor (torch.channels_last memory format), not a copy
        return tokens.permute(0, 3, 1, 2)

    # -- token retention (iBOT / DINOv2) -----------------------------------------------------------------------------
    def _refuse_patch_size(self, patch_size: int | None) -> None:
        if patch_size is not None:
            raise ValueError(f"{self.name}: the stem has a fixed stride; there is no patch size to choose")

    def retention_grid(self, size: tuple[int, int], patch_size: int | None = None) -> tuple[int, int]:
        """The last stage's grid (stride 32): a mask entry blanks the 8 x 8 stem tokens under it."""
        self._refuse_patch_size(patch_size)
        return (int(size[0]) // TOTAL_STRIDE, int(size[1]) // TOTAL_STRIDE)

    def masked_retention(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        patch_size: int | None = None,
    ) -> RetainedTokens:
        """The pooled embedding and the last stage's positions *before* the final norm, as the reference's DINOv2
        recipe for hierarchical backbones takes them; see ``MaskedTokenRetention``."""
        self._refuse_patch_size(patch_size)
        final = self._run_stages(self._tokens(x, mask, mask_token), len(self.body) - 1)[0]
        return RetainedTokens(self.features(final), final.flatten(1, 2))

    def masked_encoding_retention(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mask_token: torch.Tensor | None = None,
        return_keys: Literal["all", "features", "embedding"] = "features",
    ) -> dict[str, torch.Tensor]:
        """The reference's API: encode with masked positions kept but blanked: ``mask`` (B, H/32 * W/32), 1 =
        masked, each entry a 32x32-pixel cell; masked stem tokens become ``mask_token`` (C,) or zero, before the
        position embedding. Returns ``{"features": (B, C, H/32, W/32), "embedding": (B, C)}`` as ``return_keys``
        asks."""
        x = self._run_stages(self._tokens(x, mask, mask_token), len(self.body) - 1)[0]
        result: dict[str, torch.Tensor] = {}
        if return_keys in ("all", "features"):
            result["features"] = x.permute(0, 3, 1, 2)
        if return_keys in ("all", "embedding"):
            result["embedding"] = self.features(x)
        return result

    def adjust_size(self, new_size: tuple[int, int]) -> None:
        """Only windows given as a fraction of the size (negative ``window_spec`` entries) change; the position
        embedding is interpolated per call anyway."""
        new_size = (int(new_size[0]), int(new_size[1]))
        if new_size == self.size:
            return
        check_size(self.name, new_size)
        for blk, window in zip(self.blocks(), window_sizes(self.config, new_size)):
            blk.window_size = window
        super().adjust_size(new_size)


# (depths, embed_dim, num_heads, global_pos_size, global_att_blocks, drop_path_rate) as the reference registers them
_SIZES = {
    "tiny": ((1, 2, 7, 2), 96, 1, (7, 7), (5, 7, 9), 0.1),
    "small": ((1, 2, 11, 2), 96, 1, (7, 7), (7, 10, 13), 0.1),
    "base": ((2, 3, 16, 3), 96, 1, (14, 14), (12, 16, 20), 0.1),
    "base_plus": ((2, 3, 16, 3), 112, 2, (14, 14), (12, 16, 20), 0.1),
    "large": ((2, 6, 36, 4), 144, 2, (7, 7), (23, 33, 43), 0.2),
}
_WINDOWS = {"hieradet": (8, 4, 14, 7), "hieradet_d": (8, 4, 0, 0)}  # SAM 2's; "d": global stages 3-4


def _register_family() -> None:
    for prefix, windows in _WINDOWS.items():
        for size, (depths, dim, heads, pos_size, global_blocks, dpr) in _SIZES.items():
            cfg = HieraDetConfig(depths, dim, heads, pos_size, global_blocks, windows, drop_path_rate=dpr)
            register_model(f"{prefix}_{size}", HieraDet, cfg)


_register_family()
