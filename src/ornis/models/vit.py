"""The plain ViT family, written once: ViT with 0/1/4 registers, "nps", layer scale, LayerNorm or RMSNorm, and
FlexiViT (patch size chosen at call time).

Token layout, for every call that returns tokens: ``[register tokens..., class token, patch tokens...]``, the patch
tokens in row-major order over the (H / patch, W / patch) grid. ``forward_features`` returns all of them after the
final norm; ``embedding`` is the class token after it (the mean of the patch tokens for a model without one);
``detection_features()["neck"]`` is the last block's patch tokens *before* the final norm, as an NCHW map.

Position embeddings are stored for the grid of ``self.size`` and bicubically interpolated (no antialias) for any
other grid, so any input whose sides are multiples of the patch size works, square or not. "nps" models (no
position embedding on the special tokens) store only the patch grid's table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ornis.models.base import Encoder, Features, normalize_indices
from ornis.models.capabilities import (
    MaskedTokenOmission,
    MaskedTokenRetention,
    OmissionLayout,
    RetainedTokens,
    SinCosPositions,
    visible_cells,
)
from ornis.models.layers import (
    Attention,
    DropPath,
    LayerScale,
    Mlp,
    NormKind,
    drop_path_rates,
    interpolate_grid,
    make_norm,
    resample_patch_embed,
    run_stages,
    same_size,
    sincos_table,
)
from ornis.models.registry import register_model


@dataclass(frozen=True)
class ViTConfig:
    """A ViT variant: patch size, depth, widths, special tokens, layer scale, norm, FlexiViT's patch range."""

    patch_size: int
    num_layers: int
    num_heads: int
    hidden_dim: int
    mlp_dim: int
    num_reg_tokens: int = 0
    class_token: bool = True
    pos_embed_special_tokens: bool = True  # False is "nps": special tokens get no position embedding
    layer_scale_init: float | None = None
    norm: NormKind = "layernorm"
    norm_eps: float = 1e-6
    qkv_bias: bool = True
    flexi: bool = False  # FlexiViT: trained over random patch sizes in [min_patch_size, max_patch_size]
    min_patch_size: int = 8
    max_patch_size: int = 48
    default_size: int = 224
    drop_path_rate: float = 0.0

    # The reference's config keys (as found in a checkpoint's "config") -> (field, value map)
    ALIASES: ClassVar[dict] = {
        "layer_scale_init_value": ("layer_scale_init", None),
        "norm_layer_type": ("norm", {"LayerNorm": "layernorm", "RMSNorm": "rmsnorm"}),
        "norm_layer_eps": ("norm_eps", None),
    }


class EncoderBlock(nn.Module):
    """Pre-norm attention + MLP with optional layer scale and drop-path (also the MAE decoder's block)."""

    def __init__(self, cfg: ViTConfig, drop_path: float) -> None:
        super().__init__()
        dim = cfg.hidden_dim
        self.norm1 = make_norm(cfg.norm, dim, cfg.norm_eps)
        self.attn = Attention(dim, cfg.num_heads, qkv_bias=cfg.qkv_bias)
        self.layer_scale_1 = (
            LayerScale(dim, cfg.layer_scale_init) if cfg.layer_scale_init is not None else nn.Identity()
        )
        self.norm2 = make_norm(cfg.norm, dim, cfg.norm_eps)
        self.mlp = Mlp(dim, cfg.mlp_dim)
        self.layer_scale_2 = (
            LayerScale(dim, cfg.layer_scale_init) if cfg.layer_scale_init is not None else nn.Identity()
        )
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D)."""
        x = x + self.drop_path(self.layer_scale_1(self.attn(self.norm1(x), attn_mask)))
        return x + self.drop_path(self.layer_scale_2(self.mlp(self.norm2(x))))


class TransformerEncoder(nn.Module):
    """The stack of blocks (``encoder.block.<i>``, the published checkpoints' names)."""

    def __init__(self, cfg: ViTConfig) -> None:
        super().__init__()
        self.block = nn.Sequential(*(EncoderBlock(cfg, r) for r in drop_path_rates(cfg.drop_path_rate, cfg.num_layers)))
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor, keep: set[int] | None = None) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """All blocks; the outputs of the blocks whose index is in ``keep`` are returned too."""
        return run_stages(((blk,) for blk in self.block), x, len(self.block) - 1, keep or (), self.grad_checkpointing)


class ViT(Encoder, MaskedTokenOmission, MaskedTokenRetention, SinCosPositions):
    """A plain ViT (module docstring). Both masked forwards: token omission for MAE (visible patches only) and
    token retention for iBOT / DINOv2 (masked patches replaced by a mask token)."""

    family = "vit"
    stem_names = ("conv_proj", "class_token", "reg_tokens", "pos_embedding")
    default_mask_ratio = 0.75  # MAE's
    mim_positions = "sincos"  # MAE's encoder and decoder use a 2-D sine-cosine table

    def __init__(self, config: ViTConfig, num_classes: int, size: tuple[int, int], name: str | None = None) -> None:
        super().__init__(config, num_classes, size, name)
        cfg = config
        p = cfg.patch_size
        if size[0] % p or size[1] % p:
            raise ValueError(f"{self.name}: input size {size} is not a multiple of the patch size {p}")
        self.patch_size = p
        self.num_reg_tokens = cfg.num_reg_tokens
        self.num_special_tokens = cfg.num_reg_tokens + int(cfg.class_token)
        self.pos_embed_special_tokens = cfg.pos_embed_special_tokens

        self.conv_proj = nn.Conv2d(3, cfg.hidden_dim, kernel_size=p, stride=p)
        self.class_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_dim)) if cfg.class_token else None
        self.reg_tokens = (
            nn.Parameter(torch.zeros(1, cfg.num_reg_tokens, cfg.hidden_dim)) if cfg.num_reg_tokens else None
        )
        seq = (size[0] // p) * (size[1] // p) + (self.num_special_tokens if cfg.pos_embed_special_tokens else 0)
        self.pos_embedding = nn.Parameter(torch.empty(1, seq, cfg.hidden_dim).normal_(std=0.02))
        self.encoder = TransformerEncoder(cfg)
        self.norm = make_norm(cfg.norm, cfg.hidden_dim, cfg.norm_eps)

        self.embedding_size = cfg.hidden_dim
        self.stem_stride, self.stem_width, self.max_stride = p, cfg.hidden_dim, p
        self.return_stages = ["neck"]
        self.return_channels = [cfg.hidden_dim]
        self.classifier = self.create_classifier(num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        fan_in = 3 * self.patch_size * self.patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        for m in self.encoder.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def init_sincos_positions(self) -> None:
        """The patch grid's rows of ``pos_embedding`` as the 2-D sine-cosine table; the special tokens' rows zero."""
        h, w = self.grid_size
        with torch.no_grad():
            self.pos_embedding.zero_()
            self.pos_embedding[0, -h * w :] = sincos_table((h, w), self.pos_embedding.shape[-1])

    @property
    def grid_size(self) -> tuple[int, int]:
        """The patch grid at the model's size."""
        return (self.size[0] // self.patch_size, self.size[1] // self.patch_size)

    @property
    def patch_size_range(self) -> tuple[int, int] | None:
        """FlexiViT's trained range of patch sizes; None for a fixed-patch ViT."""
        return (self.config.min_patch_size, self.config.max_patch_size) if self.config.flexi else None

    def blocks(self) -> list[nn.Module]:
        """The transformer blocks."""
        return list(self.encoder.block)

    def no_weight_decay(self) -> set[str]:
        """Position embeddings, class and register tokens."""
        return {n for n in ("pos_embedding", "class_token", "reg_tokens") if getattr(self, n) is not None}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of storing them."""
        super().set_grad_checkpointing(enable)
        self.encoder.grad_checkpointing = enable

    # -- tokens ------------------------------------------------------------------------------------------------
    def _pos_embed(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings for a patch grid; special-token rows (if stored) are kept as they are."""
        if same_size(grid, self.grid_size):
            return self.pos_embedding
        prefix = self.num_special_tokens if self.pos_embed_special_tokens else 0
        table = interpolate_grid(self.pos_embedding[:, prefix:], self.grid_size, grid)
        return torch.cat([self.pos_embedding[:, :prefix], table], dim=1) if prefix else table

    def _special_tokens(self, batch: int) -> list[torch.Tensor]:
        tokens = [t for t in (self.reg_tokens, self.class_token) if t is not None]
        return [t.expand(batch, -1, -1) for t in tokens]

    def embed_tokens(self, x: torch.Tensor, patch_size: int | None = None) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify, add position embeddings and prepend the special tokens: (B, S + h*w, D) and the grid (h, w)."""
        return self._embed(x, patch_size)

    def _embed(
        self,
        x: torch.Tensor,
        patch_size: int | None = None,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[int, int]]:
        """``embed_tokens``; with ``mask`` (B, h*w) bool and ``mask_token`` (D,), masked patches' embeddings are
        replaced by the token before the position embeddings are added (token retention)."""
        p = patch_size or self.patch_size
        H, W = x.shape[-2:]
        if H % p or W % p:
            raise ValueError(f"{self.name}: input {H}x{W} is not a multiple of the patch size {p}")
        weight = resample_patch_embed(self.conv_proj.weight, p) if p != self.patch_size else self.conv_proj.weight
        x = F.conv2d(x, weight, self.conv_proj.bias, stride=p)
        grid = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)
        if mask is not None:
            x = torch.where(mask.unsqueeze(-1), mask_token.to(x.dtype).reshape(1, 1, -1), x)
        pos = self._pos_embed(grid)
        if not self.pos_embed_special_tokens:
            x = x + pos
        if self.num_special_tokens:
            x = torch.cat(self._special_tokens(x.shape[0]) + [x], dim=1)
        if self.pos_embed_special_tokens:
            x = x + pos
        return x, grid

    def _to_map(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        patches = tokens[:, self.num_special_tokens :]
        return patches.transpose(1, 2).reshape(patches.shape[0], patches.shape[2], *grid)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """The embedding from all final tokens: the class token, or the mean of the patch tokens without one."""
        if self.class_token is None:
            return tokens[:, self.num_special_tokens :].mean(dim=1)
        return tokens[:, self.num_reg_tokens]

    # -- public API --------------------------------------------------------------------------------------------
    def forward_features(self, x: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """All tokens after the final norm, (B, S + h*w, D), in the layout described in the module docstring."""
        tokens, _ = self.embed_tokens(x, patch_size)
        tokens, _ = self.encoder(tokens)
        return self.norm(tokens)

    def embedding(self, x: torch.Tensor, patch_size: int | None = None) -> torch.Tensor:
        """The class token after the final norm (the mean patch token for a model without one)."""
        return self.pool(self.forward_features(x, patch_size))

    def detection_features(self, x: torch.Tensor, patch_size: int | None = None) -> dict[str, torch.Tensor]:
        """``{"neck": (B, D, h, w)}``: the last block's patch tokens before the final norm."""
        tokens, grid = self.embed_tokens(x, patch_size)
        tokens, _ = self.encoder(tokens)
        return {"neck": self._to_map(tokens, grid)}

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        patch_size: int | None = None,
    ) -> Features:
        """Outputs of chosen blocks as NCHW maps (``block{i}``), plus final patch/class/register tokens.

        ``indices``: ``None`` for the last block, an int n for the last n blocks, or block indices (negative from
        the end). ``norm=True`` applies the final norm to the intermediate outputs too.
        """
        keep = normalize_indices(indices, len(self.encoder.block), "block")
        tokens, grid = self.embed_tokens(x, patch_size)
        tokens, kept = self.encoder(tokens, keep=set(keep))
        final = self.norm(tokens)
        maps = {f"block{i}": self._to_map(self.norm(kept[i]) if norm else kept[i], grid) for i in keep}
        return Features(
            maps=maps,
            patch_tokens=self._to_map(final, grid),
            embedding=self.pool(final),
            cls_token=final[:, self.num_reg_tokens] if self.class_token is not None else None,
            register_tokens=final[:, : self.num_reg_tokens] if self.num_reg_tokens else None,
        )

    # -- masked forwards -------------------------------------------------------------------------------------------
    def omission_layout(self, size: tuple[int, int]) -> OmissionLayout:
        """Cells are patches; one output, the final normed special tokens (class, registers) and patch tokens."""
        p = self.patch_size
        grid = (int(size[0]) // p, int(size[1]) // p)
        return OmissionLayout(grid, p, 1, (self.embedding_size,), (1,), self.num_special_tokens)

    def masked_omission(
        self, x: torch.Tensor, hidden: torch.Tensor, num_hidden: int | None = None
    ) -> list[torch.Tensor]:
        """The special tokens' and the visible patches' final tokens (after the final norm) as (B, S + K, 1, 1, D);
        the hidden patch tokens are dropped before the first block. See ``MaskedTokenOmission``."""
        tokens, _ = self.embed_tokens(x)
        special, patches = tokens[:, : self.num_special_tokens], tokens[:, self.num_special_tokens :]
        B, _, D = patches.shape
        keep = visible_cells(hidden, num_hidden)
        visible = patches.gather(1, keep[:, :, None].expand(-1, -1, D))
        out, _ = self.encoder(torch.cat([special, visible], dim=1))
        return [self.norm(out).reshape(B, -1, 1, 1, D)]

    def retention_grid(self, size: tuple[int, int], patch_size: int | None = None) -> tuple[int, int]:
        """The patch grid for ``patch_size`` (default: the model's)."""
        p = patch_size or self.patch_size
        return (int(size[0]) // p, int(size[1]) // p)

    def masked_retention(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        patch_size: int | None = None,
    ) -> RetainedTokens:
        """The embedding and the final normed patch tokens (DINOv2's ``x_norm_clstoken`` / ``x_norm_patchtokens``);
        see ``MaskedTokenRetention``."""
        tokens, _ = self._embed(x, patch_size, mask, mask_token)
        tokens, _ = self.encoder(tokens)
        tokens = self.norm(tokens)
        return RetainedTokens(self.pool(tokens), tokens[:, self.num_special_tokens :])

    def adjust_size(self, new_size: tuple[int, int]) -> None:
        """Re-base the stored position embeddings on another input size (bicubic with antialias, as the
        reference's ``adjust_size``), so that size runs without per-call interpolation."""
        new_size = (int(new_size[0]), int(new_size[1]))
        if new_size == self.size:
            return
        p = self.patch_size
        if new_size[0] % p or new_size[1] % p:
            raise ValueError(f"{self.name}: size {new_size} is not a multiple of the patch size {p}")
        prefix = self.num_special_tokens if self.pos_embed_special_tokens else 0
        new_grid = (new_size[0] // p, new_size[1] // p)
        with torch.no_grad():
            table = interpolate_grid(self.pos_embedding[:, prefix:], self.grid_size, new_grid, antialias=True)
            pos = torch.cat([self.pos_embedding[:, :prefix], table], dim=1)
        self.pos_embedding = nn.Parameter(pos, requires_grad=self.pos_embedding.requires_grad)
        super().adjust_size(new_size)


_SIZES = {
    "t": dict(num_layers=12, num_heads=3, hidden_dim=192, mlp_dim=768),
    "s": dict(num_layers=12, num_heads=6, hidden_dim=384, mlp_dim=1536),
    "b": dict(num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072),
    "l": dict(num_layers=24, num_heads=16, hidden_dim=1024, mlp_dim=4096),
}
_SUFFIXES = {
    "": {},
    "_ls": dict(layer_scale_init=1e-5),
    "_nps_ls": dict(pos_embed_special_tokens=False, layer_scale_init=1e-5),
    "_rms_ls": dict(norm="rmsnorm", layer_scale_init=1e-5),
}


def _register_family() -> None:
    # Names follow the reference's grammar: [flexi]vit_[regR_]<size><patch>[_nps][_rms][_ls]
    for reg in (0, 1, 4):
        reg_part = f"reg{reg}_" if reg else ""
        for size, dims in _SIZES.items():
            for suffix, extra in _SUFFIXES.items():
                for patch in (14, 16):
                    cfg = ViTConfig(patch_size=patch, num_reg_tokens=reg, **dims, **extra)
                    register_model(f"vit_{reg_part}{size}{patch}{suffix}", ViT, cfg)
                if "_nps" in suffix:
                    continue  # FlexiViT's special tokens carry no position embedding anyway
                # FlexiViT: trained at 240 with patch 16
                flexi = dict(pos_embed_special_tokens=False, flexi=True, default_size=240)
                cfg = ViTConfig(patch_size=16, num_reg_tokens=reg, **dims, **extra, **flexi)
                register_model(f"flexivit_{reg_part}{size}16{suffix}", ViT, cfg)


_register_family()
