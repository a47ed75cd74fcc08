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


def classification_report(
    scores: np.ndarray, labels: np.ndarray, class_names: Sequence[str], details: dict | None = None
) -> ClassificationReport:
    """``scores`` (N, C): any score where higher means more likely; ``labels`` (N,) true class indices."""
    scores = np.asarray(scores)
    labels = np.asarray(labels)
    n, c = scores.shape
    if n == 0:
        raise ValueError("no samples to evaluate")
    k = min(5, c)
    topk = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k < c else np.tile(np.arange(c), (n, 1))
    pred = scores.argmax(axis=1)
    top1 = float((pred == labels).mean())
    top5 = float((topk == labels[:, None]).any(axis=1).mean())
    per_class = {}
    for i, name in enumerate(class_names):
        support = int((labels == i).sum())
        predicted = int((pred == i).sum())
        hits = int(((pred == i) & (labels == i)).sum())
        per_class[str(name)] = (support, hits / predicted if predicted else 0.0, hits / support if support else 0.0)
    return ClassificationReport(top1, top5, n, per_class, dict(details or {}))
