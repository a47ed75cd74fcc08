"""Linear probe: multinomial logistic regression on frozen embeddings, its learning rate and L2 penalty chosen on a
held-out part of the training set, then refitted on all of it."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ornis.errors import EmbeddingsFormatError, OrnisError
from ornis.eval.labels import EmbeddingTable, check_classes, check_finite, stratified_split
from ornis.eval.metrics import (
    ClassificationReport,
    check_positive_int,
    classification_report,
    dropped_details,
    top_classes,
)

DEFAULT_LRS = (1e-3, 1e-2)
DEFAULT_WEIGHT_DECAYS = (0.0, 1e-4, 1e-3)


@contextmanager
def _threads_for(work_per_step: int) -> Iterator[None]:
    """One CPU thread for small steps: thread hand-offs cost more than they save there (measured 10x slower with
    2 threads on a busy 2-core machine for a 1024 x 32 x 10 step)."""
    before = torch.get_num_threads()
    if work_per_step < 4_000_000:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class LinearProbe:
    """A fitted probe: standardisation statistics of the training embeddings and the linear layer."""

    mean: torch.Tensor
    std: torch.Tensor
    weight: torch.Tensor  # (C, D)
    bias: torch.Tensor  # (C,)

    def scores(self, embeddings: np.ndarray | torch.Tensor) -> np.ndarray:
        """Class scores (logits), (N, C), of ``embeddings`` (N, D), standardised as the training embeddings were."""
        x = (torch.as_tensor(embeddings, dtype=torch.float32) - self.mean) / self.std
        return (x @ self.weight.T + self.bias).numpy()


def fit_linear_probe(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    *,
    lr: float,
    weight_decay: float,
    epochs: int = 100,
    batch_size: int = 1024,
    seed: int = 0,
) -> LinearProbe:
    """Adam on the cross-entropy plus ``weight_decay * ||W||^2``, cosine-decayed learning rate; deterministic."""
    x = torch.as_tensor(embeddings, dtype=torch.float32)
    y = torch.as_tensor(labels, dtype=torch.long)
    mean = x.mean(dim=0)
    std = x.std(dim=0).clamp_min(1e-6)  # standardised inputs make one learning rate fit every encoder's scale
    x = (x - mean) / std
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    steps_per_epoch = max(1, -(-len(x) // batch_size))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    with _threads_for(min(batch_size, len(x)) * x.shape[1] * num_classes):
        for _ in range(epochs):
            order = torch.randperm(len(x), generator=gen)
            for start in range(0, len(x), batch_size):
                rows = order[start : start + batch_size]
                loss = F.cross_entropy(layer(x[rows]), y[rows]) + weight_decay * layer.weight.pow(2).sum()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return LinearProbe(mean, std, layer.weight.detach().clone(), layer.bias.detach().clone())


def evaluate_linear_probe(
    train: EmbeddingTable,
    test: EmbeddingTable | None = None,
    *,
    lrs: Sequence[float] = DEFAULT_LRS,
    weight_decays: Sequence[float] = DEFAULT_WEIGHT_DECAYS,
    held_out: float = 0.2,
    epochs: int = 100,
    seed: int = 0,
    drop_non_finite: bool = False,
) -> ClassificationReport:
    """Linear-probe accuracy on ``test``; without ``test``, on a stratified ``held_out`` part of ``train``.

    The (lr, weight decay) pair is chosen by accuracy on a held-out ``held_out`` part of the (remaining) training
    rows; the probe is then refitted on all training rows with it. The training set needs at least two classes; rows
    with NaN or Inf embeddings are an ``EmbeddingsFormatError`` unless ``drop_non_finite=True`` leaves them out
    (their count goes into the report's details). A fit that diverges (non-finite scores) is never chosen.
    """
    check_probe_arguments(lrs, weight_decays, held_out, epochs)
    train = check_finite(train, drop_non_finite)
    check_classes(train, "a linear probe")
    names = train.class_names
    if test is None:
        dropped = dropped_details(train)  # before the split: both parts carry the count
        kept, out = stratified_split(train.labels, held_out, seed)
        train, test = train.subset(kept), train.subset(out)
        protocol = f"held-out {held_out:.0%} of one set"
    else:
        if test.labels is None or test.class_names != names:
            raise EmbeddingsFormatError(
                f"{test.name}: the test set needs labels encoded with the training set's class names"
            )
        test = check_finite(test, drop_non_finite)
        dropped = dropped_details(train, test)
        if test.embeddings.shape[1] != train.embeddings.shape[1]:
            raise EmbeddingsFormatError(
                f"embedding sizes differ: train {train.embeddings.shape[1]}, test {test.embeddings.shape[1]}"
            )
        protocol = "train/test"
    fit_rows, val_rows = stratified_split(train.labels, held_out, seed + 1)
    sweep: dict[tuple[float, float], float] = {}
    for lr, wd in itertools.product(lrs, weight_decays):
        probe = fit_linear_probe(
            train.embeddings[fit_rows],
            train.labels[fit_rows],
            len(names),
            lr=lr,
            weight_decay=wd,
            epochs=epochs,
            seed=seed,
        )
        scores = probe.scores(train.embeddings[val_rows])
        pred = top_classes(scores, 1)[:, 0]
        # a diverged fit (a too large learning rate) scores NaN: never chosen
        sweep[(lr, wd)] = float((pred == train.labels[val_rows]).mean()) if np.isfinite(scores).all() else -1.0
    # Ties go to the stronger penalty, then the smaller learning rate: the more conservative fit
    lr, wd = max(sweep, key=lambda p: (sweep[p], p[1], -p[0]))
    probe = fit_linear_probe(
        train.embeddings, train.labels, len(names), lr=lr, weight_decay=wd, epochs=epochs, seed=seed
    )
    scores = probe.scores(test.embeddings)
    if not np.isfinite(scores).all():
        raise OrnisError(
            f"the linear probe diverged (non-finite scores) at lr={lr}: try smaller learning rates (--lrs)"
        )
    details = {
        "lr": lr,
        "weight_decay": wd,
        "sweep_val_top1": round(sweep[(lr, wd)], 4),
        "protocol": protocol,
        **dropped,
    }
    return classification_report(scores, test.labels, names, details)


def check_probe_arguments(lrs: Sequence[float], weight_decays: Sequence[float], held_out: float, epochs: int) -> None:
    """``ValueError`` naming the argument for an empty sweep, a learning rate not above 0, a negative or NaN
    weight decay, a held-out fraction outside (0, 1) or fewer than one epoch."""
    if not len(lrs) or not all(lr > 0 and math.isfinite(lr) for lr in lrs):
        raise ValueError(f"lrs must be one or more positive numbers, got {list(lrs)}")
    if not len(weight_decays) or not all(wd >= 0 and math.isfinite(wd) for wd in weight_decays):
        raise ValueError(f"weight_decays must be one or more numbers >= 0, got {list(weight_decays)}")
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    check_positive_int("epochs", epochs)
