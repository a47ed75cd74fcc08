"""Top-k accuracy and a per-class report from class scores."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class ClassificationReport:
    """Top-1 and top-5 accuracy (fractions) over ``count`` samples, and per-class support, precision and recall."""

    top1: float
    top5: float
    count: int
    # per class: name -> (support, precision, recall / per-class accuracy)
    per_class: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    details: dict = field(default_factory=dict)  # method-specific facts (k, temperature, chosen lr, ...)

    def format(self, title: str = "") -> str:
        """A text table: the accuracies, the ``details`` and one line per class, under ``title`` when given."""
        width = max([len(n) for n in self.per_class] + [5])
        lines = [title] if title else []
        lines.append(f"top-1 {self.top1:.4f}  top-5 {self.top5:.4f}  ({self.count} samples)")
        if self.details:
            lines.append("  ".join(f"{k}={v}" for k, v in self.details.items()))
        lines.append(f"{'class':<{width}}  support  precision  recall")
        for name, (support, precision, recall) in self.per_class.items():
            lines.append(f"{name:<{width}}  {support:>7d}  {precision:>9.4f}  {recall:>6.4f}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """A JSON-ready dict: accuracies, count, per-class stats as dicts, and the ``details`` merged in at the top."""
        return {
            "top1": self.top1,
            "top5": self.top5,
            "count": self.count,
            "per_class": {k: {"support": s, "precision": p, "recall": r} for k, (s, p, r) in self.per_class.items()},
            **self.details,
        }


def top_classes(scores: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` best classes of each row of ``scores`` (N, C), best first: (N, k).

    One ranking serves top-1 and top-k, so top-k can never miss the top-1 prediction (``argmax`` and
    ``argpartition`` used to disagree on NaN scores, which ``argmax`` ranks first and ``argpartition`` last, and on
    ties). Ties go to the lower class index, as ``argmax``'s do; NaN ranks below every number.
    """
    cost = -np.where(np.isnan(scores), -np.inf, scores)  # lower is better
    n, c = cost.shape
    k = min(k, c)
    part = np.argpartition(cost, k - 1, axis=1)[:, :k] if k < c else np.tile(np.arange(c), (n, 1))
    order = np.lexsort((part, np.take_along_axis(cost, part, axis=1)), axis=1)  # by cost, then class index
    return np.take_along_axis(part, order, axis=1)


def dropped_details(*tables: object) -> dict[str, int]:
    """``{"dropped_non_finite": n}`` for a report's details when rows of these tables were left out, else ``{}``."""
    dropped = sum(getattr(t, "dropped_non_finite", 0) for t in tables if t is not None)
    return {"dropped_non_finite": dropped} if dropped else {}


def classification_report(
    scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], details: dict | None = None
) -> ClassificationReport:
    """``scores`` (N, C): any score where higher means more likely; ``labels`` (N,) true class indices."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    n, c = scores.shape
    if n == 0:
        raise ValueError("no samples to evaluate")
    topk = top_classes(scores, min(5, c))
    pred = topk[:, 0]
    top1 = float((pred == labels).mean())
    top5 = float((topk == labels[:, None]).any(axis=1).mean())
    per_class = {}
    for i, name in enumerate(class_names):
        support = int((labels == i).sum())
        predicted = int((pred == i).sum())
        hits = int(((pred == i) & (labels == i)).sum())
        per_class[str(name)] = (support, hits / predicted if predicted else 0.0, hits / support if support else 0.0)
    return ClassificationReport(top1, top5, n, per_class, dict(details or {}))


def check_positive_int(name: str, value: int) -> None:
    """``ValueError`` naming the argument unless ``value`` is a positive integer (Python or NumPy, not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
