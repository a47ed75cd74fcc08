"""Blocks shared by every family: attention, MLP, layer scale, norms, drop path, position-embedding resizing.

Module and parameter names follow the published checkpoints (e.g. ``attn.qkv``, ``mlp.0``, ``layer_scale_1.gamma``)
so those files load with ``strict=True`` and no key remapping.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Iterable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import statically_known_true
from torch.utils.checkpoint import checkpoint

from ornis.models import onednn

NormKind = Literal["layernorm", "rmsnorm"]


def make_norm(kind: NormKind, dim: int, eps: float) -> nn.Module:
    """``nn.LayerNorm`` or ``nn.RMSNorm`` over the last ``dim`` channels."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}: expected 'layernorm' or 'rmsnorm'")


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016); the identity outside training."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` with whole samples dropped (and the rest scaled up) in training."""
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        """The drop probability in ``repr``."""
        return f"p={self.p}"


def without_stochastic_depth(model: nn.Module) -> None:
    """Turn every ``DropPath`` in ``model`` into the identity (p = 0) without touching its config, so a checkpoint
    written from it still records, and a fine-tuning run from it still gets, the architecture's own rates."""
    for module in model.modules():
        if isinstance(module, DropPath):
            module.p = 0.0


def drop_path_rates(rate: float, count: int) -> list[float]:
    """Stochastic-depth rates growing linearly from 0 to ``rate`` over ``count`` blocks (plain floats, so models
    can be built on the meta device). ValueError for a rate outside [0, 1), before any block is built."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {rate}")
    return [rate * i / (count - 1) if count > 1 else 0.0 for i in range(count)]


class LayerScale(nn.Module):
    """Per-channel residual scaling (CaiT / DeiT III). Works on channels-last tensors."""

    def __init__(self, dim: int, init_value: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), init_value))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x * gamma``."""
        return x * self.gamma


class Mlp(nn.Sequential):
    """Linear, activation, dropout, linear, dropout: indices 0 and 3 hold the weights (``mlp.0``, ``mlp.3``)."""

    def __init__(
        self,
        dim: int,
        hidden_dim: int,
        act: Callable[[], nn.Module] = nn.GELU,
        dropout: float = 0.0,
        out_dim: int | None = None,
    ) -> None:
        super().__init__(
            nn.Linear(dim, hidden_dim),
            act(),
            nn.Dropout(dropout),
            nn.Linear(hidden_dim, out_dim or dim),
            nn.Dropout(dropout),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layers in order; without gradients on the CPU, bias and GELU fused into the matmuls (``onednn``)."""
        fc1, act, drop1, fc2, drop2 = self
        return drop2(onednn.linear(fc2, drop1(onednn.linear_gelu(fc1, act, x))))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and PyTorch's fused SDPA kernels."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, C) -> (B, N, C)."""
        B, N, C = x.shape
        q, k, v = (
            onednn.linear(self.qkv, x).view(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        )
        x = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_drop if self.training else 0.0
        )
        return onednn.linear(self.proj, x.transpose(1, 2).reshape(B, N, C))


def same_size(a: tuple[int, int], b: tuple[int, int]) -> bool:
    """``a == b`` when that is known without a shape guard: under ``torch.export`` with a dynamic input size the
    sizes are symbolic and this is False (the size-generic path is taken and the exported graph stays valid for
    every size, the stored size included, where bicubic resizing to the same size is exact)."""
    equal = (a[0] == b[0], a[1] == b[1])  # tensors under torch.jit.trace, SymBools under torch.export
    return all(statically_known_true(e) if isinstance(e, (bool, torch.SymBool)) else bool(e) for e in equal)


def run_stages(
    stages: Iterable[Iterable[nn.Module]],
    x: torch.Tensor,
    last: int,
    keep: Container[int] = (),
    grad_checkpointing: bool = False,
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Run stages 0..``last`` (each a sequence of blocks; later ones are skipped) and return the output and
    ``{stage index: output}`` for the stages in ``keep``. With ``grad_checkpointing`` each block's activations are
    recomputed in the backward pass instead of stored (memory for compute, training only)."""
    kept: dict[int, torch.Tensor] = {}
    for i, stage in enumerate(stages):
        if i > last:
            break
        for blk in stage:
            if grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        if i in keep:
            kept[i] = x
    return x, kept


def interpolate_grid(
    grid: torch.Tensor,
    old_hw: tuple[int, int],
    new_hw: tuple[int, int],
    mode: str = "bicubic",
    antialias: bool = False,
) -> torch.Tensor:
    """Resize a (1, h*w, D) table of per-position embeddings laid out row-major on an h x w grid.

    Interpolation runs in float32 (bicubic kernels are not implemented for half types on every device) and the
    result is cast back. ``antialias`` only matters when shrinking.
    """
    if same_size(old_hw, new_hw):
        return grid
    dim = grid.shape[-1]
    out = grid.float().reshape(1, old_hw[0], old_hw[1], dim).permute(0, 3, 1, 2)
    out = F.interpolate(
        out, size=new_hw, mode=mode, antialias=antialias, align_corners=False if mode != "nearest" else None
    )
    return out.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], dim).to(grid.dtype)


def sincos_table(grid: tuple[int, int], dim: int) -> torch.Tensor:
    """(h*w, ``dim``) 2-D sine-cosine position embeddings, row-major (MAE's and I-JEPA's fixed table): the first half
    of the channels encodes the row, the second the column, each as sin then cos over ``dim // 4`` frequencies
    ``1 / 10000^(i / (dim // 4))``. Values in [-1, 1]; ``dim`` must be a multiple of 4."""
    if dim % 4:
        raise ValueError(f"a 2-D sine-cosine table needs a width that is a multiple of 4, found {dim}")
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    rows, cols = torch.meshgrid(
        torch.arange(grid[0], dtype=torch.float64), torch.arange(grid[1], dtype=torch.float64), indexing="ij"
    )
    parts = []
    for pos in (rows.reshape(-1), cols.reshape(-1)):
        angle = pos[:, None] * omega[None, :]
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


_PINV_CACHE: dict[tuple[tuple[int, int], tuple[int, int], str], torch.Tensor] = {}


def _pinv_resize_matrix(old: tuple[int, int], new: tuple[int, int], device: torch.device) -> torch.Tensor:
    # FlexiViT (Beyer et al., 2023, eq. 3): with B the matrix of bilinear resizing from old to new patch size,
    # the patch-embedding weights that keep <x, w> = <Bx, w'> for every patch x are w' = pinv(B)^T w.
    key = (old, new, str(device))
    if key in _PINV_CACHE:
        return _PINV_CACHE[key]
    with torch.autocast(device.type, enabled=False), torch.no_grad():
        n_old = old[0] * old[1]
        basis = torch.eye(n_old, dtype=torch.float32, device=device).reshape(n_old, 1, *old)
        resized = F.interpolate(basis, size=new, mode="bilinear", align_corners=False)
        matrix = resized.reshape(n_old, new[0] * new[1]).T  # (new_numel, old_numel)
        pinv = torch.linalg.pinv(matrix)
    # Under torch.compile / torch.export the tensors are fake: use the result in the graph, never keep it
    if not torch.compiler.is_compiling():
        _PINV_CACHE[key] = pinv
    return pinv


def resample_patch_embed(weight: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Resample conv patch-embedding weights (D, C, p, p) to another patch size by FlexiViT's pseudo-inverse resize."""
    old = (weight.shape[-2], weight.shape[-1])
    new = (patch_size, patch_size)
    if old == new:
        return weight
    pinv = _pinv_resize_matrix(old, new, weight.device)
    out = weight.float().flatten(2) @ pinv
    return out.reshape(*weight.shape[:2], *new).to(weight.dtype)
