"""The three DINOv2 losses: DINO on the class token, iBOT on masked patch tokens, KoLeo on the backbone embedding.

DINOv2 (Oquab et al., 2023, section 4): the student's view-level prototype scores are pulled towards the EMA
teacher's (centred, sharpened) distribution for every (student view, teacher view) pair of *different* views; the
student's scores for masked patches towards the teacher's scores for the same, unmasked patches; and KoLeo
(Sablayrolles et al., 2019) spreads the embeddings of a batch by pushing each one away from its nearest neighbour.
Every loss works in float32 whatever the autocast dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ornis.utils.distributed import gather_with_grad


def _cross_entropy(teacher_probs: torch.Tensor, student_logits: torch.Tensor, student_temp: float) -> torch.Tensor:
    """Per-row cross-entropy H(teacher, softmax(student / temp)) in float32."""
    log_p = F.log_softmax(student_logits.float() / student_temp, dim=-1)
    return -(teacher_probs.float() * log_p).sum(dim=-1)


def dino_loss(
    student_logits: Sequence[torch.Tensor], teacher_probs: Sequence[torch.Tensor], student_temp: float = 0.1
) -> torch.Tensor:
    """Mean over (student view, teacher view) pairs of the batch-mean cross-entropy, skipping same-view pairs.

    ``teacher_probs[t]`` is the teacher's target for global view ``t``; ``student_logits`` lists the student's
    scores for the same global views first (so ``student_logits[t]`` sees what ``teacher_probs[t]`` saw and is not
    paired with it), then the local views. Each tensor is (B, K).
    """
    total = student_logits[0].new_zeros((), dtype=torch.float32)
    pairs = 0
    for s, logits in enumerate(student_logits):
        for t, probs in enumerate(teacher_probs):
            if s == t:
                continue
            total = total + _cross_entropy(probs, logits, student_temp).mean()
            pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss needs at least one pair of different views (two global views, or local views)")
    return total / pairs


def ibot_loss(
    student_patch_logits: torch.Tensor,
    teacher_patch_probs: torch.Tensor,
    patch_weights: torch.Tensor,
    num_views: int,
    student_temp: float = 0.1,
) -> torch.Tensor:
    """iBOT masked-patch loss: each masked view's mean cross-entropy over its masked patches, averaged over all
    ``num_views`` global views of the batch (views without masked patches count as zero, as in DINOv2).

    ``student_patch_logits`` / ``teacher_patch_probs``: (M, K) for the M masked patches of the batch;
    ``patch_weights``: (M,), 1 / (number of masked patches of the patch's view).
    """
    if student_patch_logits.shape[0] == 0:
        return student_patch_logits.float().sum() * 0.0
    ce = _cross_entropy(teacher_patch_probs, student_patch_logits, student_temp)
    return (ce * patch_weights.float()).sum() / num_views


def koleo_loss(embeddings: torch.Tensor, eps: float = 1e-8, gather: bool = True) -> torch.Tensor:
    """KoLeo regulariser: ``-mean_i log(min_{j != i} ||x_i - x_j|| + eps)`` over L2-normalised rows of ``embeddings``.

    Safe at small batches and with duplicates: the neighbour search excludes each row by *index* (not by value),
    so an exact duplicate is a neighbour at distance 0, where the loss is ``-log(eps)`` and the gradient is 0 (a
    norm's subgradient) instead of NaN; ``eps`` sits inside the log so the value stays finite. A batch of fewer than
    two rows has no neighbours and gives 0. With ``gather`` the rows of every rank are searched (gradients flow back
    to their own rank), so the loss does not depend on how the batch is split over processes.
    """
    if gather:
        embeddings = gather_with_grad(embeddings)
    with torch.autocast(embeddings.device.type, enabled=False):
        x = F.normalize(embeddings.float(), dim=-1, eps=eps)
        n = x.shape[0]
        if n < 2:
            return x.sum() * 0.0
        with torch.no_grad():
            similarity = x @ x.T
            similarity.fill_diagonal_(-math.inf)
            neighbour = similarity.argmax(dim=1)
        distance = torch.linalg.vector_norm(x - x[neighbour], dim=-1)
        return -torch.log(distance + eps).mean()
