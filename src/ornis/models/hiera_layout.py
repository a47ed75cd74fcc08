"""Hiera's unrolled token layout.

After the stem, tokens are "unrolled" once, so that every 2x2 neighbourhood that a later query
pooling merges, and every 8x8 mask unit, is a contiguous run of the sequence: token index =
``(sy1, sx1, sy2, sx2, sy3, sx3, h, w)`` where ``y = 8h + 4 sy3 + 2 sy2 + sy1`` (likewise x) and ``(h, w)`` is the
mask unit. Query pooling is then a max over the slowest axis, and mask-unit attention a reshape, with no gather.
Each pooling consumes the finest ``(sy, sx)`` pair; after the third, tokens are in plain row-major order.
Intermediate stages are "rerolled" to NCHW maps only when asked for.
"""

from __future__ import annotations

import torch

from ornis.models.hierarchical import Q_POOL


def unroll(x: torch.Tensor, levels: int = Q_POOL) -> torch.Tensor:
    """(B, C, Y, X) map -> (B, Y*X, C) tokens in the unrolled order (module docstring), in one copy."""
    B, C, Y, X = x.shape
    h, w = Y >> levels, X >> levels
    x = x.view(B, C, h, *(2,) * levels, w, *(2,) * levels)
    # view dims: B, C, h, sy_levels..sy_1, w, sx_levels..sx_1; sy_k sits at 3 + levels - k
    order = [0]
    for k in range(1, levels + 1):
        order += [3 + levels - k, 4 + 2 * levels - k]
    order += [2, 3 + levels, 1]
    return x.permute(order).reshape(B, Y * X, C)


def reroll(x: torch.Tensor, levels: int, units: tuple[int, int] | None) -> torch.Tensor:
    """Undo the unrolling that ``levels`` poolings have not consumed yet.

    With ``units=(h, w)`` (the mask-unit grid): a (B, C, h * 2**levels, w * 2**levels) map. With ``units=None``
    (token masking, mask units dropped): (B, K, m, m, C) with m = 2**levels, one m x m patch per kept mask unit.
    """
    B, N, C = x.shape
    m = 1 << levels
    # view dims: B, (sy_1, sx_1), ..., (sy_L, sx_L), units..., C; sy_k at 2k - 1, sx_k at 2k
    sy = [2 * k - 1 for k in range(levels, 0, -1)]
    sx = [2 * k for k in range(levels, 0, -1)]
    if units is None:
        x = x.view(B, *(2,) * (2 * levels), N // (m * m), C)
        return x.permute(0, 2 * levels + 1, *sy, *sx, 2 * levels + 2).reshape(B, -1, m, m, C)
    h, w = units
    x = x.view(B, *(2,) * (2 * levels), h, w, C)
    return x.permute(0, 2 * levels + 3, 2 * levels + 1, *sy, 2 * levels + 2, *sx).reshape(B, C, h * m, w * m)
