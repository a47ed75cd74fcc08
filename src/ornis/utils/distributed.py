"""One home for ``torch.distributed``: the launch (torchrun's environment), this process's place in it, the device it
should use, and the few collectives the rest of ornis needs, each a no-op outside a process group."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job: rank, world size, rank on this machine, and whether it started the group
    (and so should destroy it)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0


def env_world_size() -> int:
    """The world size torchrun announced (1 when not launched by it)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(backend: str | None = None) -> DistInfo:
    """Join the process group torchrun describes in the environment (a no-op for a single process, or when a group
    is already up). ``backend`` defaults to NCCL when there is a GPU, else gloo."""
    owns = False
    if env_world_size() > 1 and not is_distributed():
        dist.init_process_group(backend or ("nccl" if torch.cuda.is_available() else "gloo"))
        owns = True
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if is_distributed():
        return DistInfo(dist.get_rank(), dist.get_world_size(), local, owns)
    return DistInfo(0, 1, local, False)


def close_distributed(info: DistInfo | None = None) -> None:
    """Destroy the process group if ``info`` says this process started it (always, when ``info`` is None)."""
    if is_distributed() and (info is None or info.owns_group):
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is up."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """The number of processes in the group (1 outside one)."""
    return dist.get_world_size() if is_distributed() else 1


def default_device(requested: str | torch.device | None = None) -> torch.device:
    """``requested`` if given; else this rank's GPU (``cuda:LOCAL_RANK``, made current) when there is one; else CPU."""
    if requested is not None:
        return torch.device(requested)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def default_num_workers(device: torch.device, processes_per_node: int | None = None) -> int:
    """Data-loader workers per process: on a GPU all CPUs but one decode; on the CPU the model needs half of them
    (at most 4). ``processes_per_node`` defaults to torchrun's ``LOCAL_WORLD_SIZE``."""
    if processes_per_node is None:
        processes_per_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cpus // max(1, processes_per_node))
    return min(32, max(1, per_process - 1)) if device.type == "cuda" else min(4, max(1, per_process // 2))


def barrier() -> None:
    """Wait until every rank gets here (a no-op outside a process group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place (and returned)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Maximum over ranks, in place (and returned)."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    """The mean of ``value`` over ranks (a new tensor; ``value`` itself outside a group)."""
    if not is_distributed():
        return value
    value = value.clone()
    dist.all_reduce(value)
    return value / dist.get_world_size()


def all_true(ok: bool) -> bool:
    """True when ``ok`` is true on every rank."""
    if not is_distributed():
        return ok
    t = torch.tensor([0.0 if ok else 1.0])
    dist.all_reduce(t)
    return t.item() == 0.0


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
