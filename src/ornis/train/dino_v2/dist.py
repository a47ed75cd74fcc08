"""The few collective operations the DINOv2 losses need, each a no-op outside ``torch.distributed``.

Centering and Sinkhorn-Knopp normalise over the *global* batch, as DINOv2 does, so one process with batch B and
W processes with batch B / W each compute the same targets.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (and returned)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 that passes gradients back to the rank that owns each slice.

    The backward sums every rank's gradient for the whole gathered tensor (all_reduce, which gloo and NCCL both
    support, unlike reduce-scatter / all-to-all on gloo) and keeps this rank's slice. Under DDP's gradient
    averaging that makes a loss over the gathered batch train exactly as it would in one process.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank = dist.get_rank()
        ctx.rows = x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Rows of ``x`` from every rank, concatenated in rank order; differentiable. Needs equal row counts."""
    if not is_distributed() or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)
