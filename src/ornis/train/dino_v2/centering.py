"""How the teacher's prototype scores become targets: Sinkhorn-Knopp, or softmax with an EMA centre; and the
teacher temperature schedule.

Both centrings keep the teacher from collapsing onto a few prototypes. Both work over the global batch (every
rank's rows), so the targets do not depend on how a batch is split over processes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ornis.utils.distributed import all_reduce_max, all_reduce_sum


def _global_logsumexp_over_rows(log_q: torch.Tensor) -> torch.Tensor:
    """log of the column sums of exp(log_q) over the rows of every rank, (1, K); stable for any magnitude."""
    if log_q.shape[0]:
        peak = log_q.amax(dim=0, keepdim=True)
    else:  # no rows here (a rank whose views drew no iBOT mask): it still joins the collectives
        peak = log_q.new_full((1, log_q.shape[1]), -math.inf)
    peak = all_reduce_max(peak.clone())
    total = all_reduce_sum((log_q - peak).exp().sum(dim=0, keepdim=True))
    return peak + total.log()


@torch.no_grad()
def sinkhorn_knopp(
    teacher_logits: torch.Tensor, teacher_temp: float, iterations: int = 3, extra_logits: torch.Tensor | None = None
) -> torch.Tensor:
    """Sinkhorn-Knopp targets (SwAV, Caron et al., 2020; DINOv2's ``sinkhorn_knopp_teacher``), (N, K) -> (N, K).

    Alternately gives every prototype the same total mass over the global batch and makes every row a
    distribution; the result's rows sum to 1. Run in the log domain in float32: the same numbers as the usual
    ``exp(logits / temp)`` form, which overflows once ``logits / temp`` passes ~88 (a trained head at temperature
    0.04 gets there) and divides 0 by 0 when a prototype's scores all underflow, as happens at small batches.

    ``extra_logits`` (e.g. a queue of earlier teacher outputs, rows of this rank only) join the balancing but are
    not returned: with a small batch the prototype-balancing constraint is then spread over more rows.
    """
    if iterations < 1:
        raise ValueError(f"Sinkhorn-Knopp needs at least 1 iteration, got {iterations}")
    rows = teacher_logits.shape[0]
    logits = teacher_logits if extra_logits is None else torch.cat([teacher_logits, extra_logits.to(teacher_logits)])
    log_q = logits.float() / teacher_temp
    for _ in range(iterations):
        log_q = log_q - _global_logsumexp_over_rows(log_q)
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True)
    return log_q[:rows].exp()


class SoftmaxCentering(nn.Module):
    """DINO's centring: ``softmax((logits - centre) / temp)``, the centre an EMA of the global batch mean of the
    teacher's logits (updated after the targets are computed, so a step's targets use the previous centre)."""

    def __init__(self, dim: int, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(1, dim))

    @torch.no_grad()
    def forward(self, teacher_logits: torch.Tensor, teacher_temp: float) -> torch.Tensor:
        """Targets from the current centre; the centre then moves towards this batch's mean."""
        logits = teacher_logits.float()
        probs = torch.softmax((logits - self.center) / teacher_temp, dim=-1)
        self.update(logits)
        return probs

    @torch.no_grad()
    def update(self, teacher_logits: torch.Tensor) -> None:
        """Move the centre towards the global batch mean of ``teacher_logits``."""
        # Sum and count over every rank: the exact global mean even when ranks hold different numbers of rows
        # (the masked patches of iBOT), and no update from an empty step
        stats = torch.cat(
            [teacher_logits.float().sum(dim=0), teacher_logits.new_full((1,), teacher_logits.shape[0]).float()]
        )
        all_reduce_sum(stats)
        count = float(stats[-1])
        if count == 0:
            return
        mean = (stats[:-1] / count).unsqueeze(0)
        self.center.mul_(self.momentum).add_(mean, alpha=1.0 - self.momentum)


class LogitQueue(nn.Module):
    """A FIFO of this rank's most recent teacher logits, for Sinkhorn-Knopp at small batches (Birder's
    ``SinkhornQueue`` idea). Empty until it has been filled once, so early steps balance over the batch alone."""

    def __init__(self, size: int, dim: int) -> None:
        super().__init__()
        self.size = size
        self.register_buffer("rows", torch.zeros(size, dim))
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("full", torch.zeros((), dtype=torch.bool))

    def contents(self) -> torch.Tensor | None:
        """The queued rows once the queue has been filled, else None."""
        return self.rows if bool(self.full) else None

    @torch.no_grad()
    def push(self, logits: torch.Tensor) -> None:
        """Queue a step's rows, dropping the oldest."""
        logits = logits.detach().to(self.rows.dtype)[-self.size :]
        n = logits.shape[0]
        start = int(self.pointer)
        index = (torch.arange(n, device=self.rows.device) + start) % self.size
        self.rows[index] = logits
        self.full |= start + n >= self.size
        self.pointer.fill_((start + n) % self.size)


def teacher_temperature(step: int, warmup_steps: int, warmup_temp: float = 0.04, temp: float = 0.07) -> float:
    """DINO's teacher temperature: linear from ``warmup_temp`` to ``temp`` over ``warmup_steps``, then ``temp``.
    A low temperature early sharpens the targets while the prototypes are still random."""
    if step >= warmup_steps or warmup_steps <= 0:
        return temp
    return warmup_temp + (temp - warmup_temp) * step / warmup_steps


def check_centering(centering: str, prototypes: int, teacher_rows: int, queue_size: int, processes: int) -> None:
    """``ValueError`` when Sinkhorn-Knopp cannot give sharp targets: it caps a row's largest probability near
    N / K, so the rows balanced together (the global batch's ``teacher_rows`` plus every process's queue) must
    reach the ``prototypes``. Softmax centring has no such limit."""
    if centering not in ("softmax", "sinkhorn_knopp"):
        raise ValueError(f"centering must be 'softmax' or 'sinkhorn_knopp', got {centering!r}")
    rows = teacher_rows + queue_size * processes
    if centering == "sinkhorn_knopp" and rows < prototypes:
        need = -(-(prototypes - teacher_rows) // processes)
        raise ValueError(
            f"sinkhorn_knopp balances {rows} teacher rows over {prototypes} prototypes, which caps every target "
            f"near {rows}/{prototypes} and leaves the DINO loss at ln K; use centering='softmax' (--centering "
            f"softmax), a queue of at least {need} rows per process (--sinkhorn-queue-size), or fewer prototypes"
        )


@torch.no_grad()
def collapse_diagnostics(
    student_logits: list[torch.Tensor], teacher_probs: list[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """The numbers that tell a learning run from a collapsing one, as 0-d tensors (no host sync): the teacher
    targets' mean entropy (ln K: uniform, 0: one-hot) and mean largest probability, and the share of rows where the
    student's top prototype for one global view is the teacher's for the other (cross-view agreement)."""
    probs = torch.cat(teacher_probs).float()
    entropy = -(probs * probs.clamp_min(1e-30).log()).sum(dim=-1).mean()
    largest = probs.amax(dim=-1).mean()
    agree = [
        (s.argmax(dim=-1) == t.argmax(dim=-1)).float().mean()
        for i, s in enumerate(student_logits)
        for j, t in enumerate(teacher_probs)
        if i != j
    ]
    agreement = torch.stack(agree).mean() if agree else probs.new_zeros(())
    return {"target_entropy": entropy, "target_max": largest, "agreement": agreement}


@torch.no_grad()
def view_correlation(teacher_logits: torch.Tensor, views: int = 2) -> torch.Tensor:
    """Mean cosine, over the images of the batch, between the teacher's batch-centred scores of an image's first two
    global views (rows view-major), as a 0-d tensor: how much of what the teacher says about one image survives
    augmentation. Self-distillation amplifies it by ``student_temp / teacher_temp`` per round; while that product is
    below 1 the student's best answer is the batch mean, the head learns to score every image alike and the DINO term
    stays at ln K (random-init features of small, plain images: about 0.15)."""
    first, second = teacher_logits.float().chunk(views)[:2]
    first = F.normalize(first - first.mean(dim=0, keepdim=True), dim=-1)
    second = F.normalize(second - second.mean(dim=0, keepdim=True), dim=-1)
    return (first * second).sum(dim=-1).mean()
