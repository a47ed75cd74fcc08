"""Measuring a model while it trains: DINO's weighted k-NN on two labelled folders (any recipe, ``--eval-knn``) and
the checks a labelled set passes before the first step (at least two classes, none empty)."""

from __future__ import annotations

import logging
import os
from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ornis.eval.knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_predict
from ornis.train.data import DatasetError, SampleDataset, Source, eval_transform, open_source
from ornis.weights.checkpoint import DEFAULT_RGB_STATS

log = logging.getLogger("ornis.train")


def check_labelled(source: Source, where: str, class_to_idx: dict[str, int] | None = None) -> None:
    """``DatasetError`` unless ``source`` has at least two classes and an image in every class it declares (or,
    for a validation set, in at least one of the training classes ``class_to_idx``)."""
    counts = Counter(label for label in _labels(source))
    classes = source.class_to_idx if class_to_idx is None else class_to_idx
    if class_to_idx is None:
        if len(classes) < 2:
            raise DatasetError(f"{where}: {len(classes)} class(es) {sorted(classes)}; classification needs at least 2")
        empty = sorted(name for name, i in classes.items() if counts.get(i, 0) == 0)
        if empty:
            raise DatasetError(f"{where}: class folder(s) {empty[:5]} hold no image")
    elif not counts:
        raise DatasetError(f"{where}: no labelled image of the training classes {sorted(classes)[:10]}")


def _labels(source: Source) -> list[int]:
    if hasattr(source, "samples"):
        return [s.label for s in source.samples]
    return [m.label for m in source.members]


class KnnMonitor:
    """k-NN top-1 (k = 20, T = 0.07, DINO's protocol) of an encoder's embeddings: ``val`` images voted by their
    nearest ``train`` images. The folders are read (and checked) when the monitor is made, before training."""

    def __init__(
        self,
        train: str | os.PathLike,
        val: str | os.PathLike,
        size: tuple[int, int],
        rgb_stats: dict[str, Any] | None = None,
        batch_size: int = 64,
        k: int = DEFAULT_K,
    ) -> None:
        self.train = open_source(train, labelled=True)
        check_labelled(self.train, f"--eval-knn {train}")
        self.val = open_source(val, labelled=True, class_to_idx=self.train.class_to_idx)
        check_labelled(self.val, f"--eval-knn {val}", self.train.class_to_idx)
        transform = eval_transform(size, dict(rgb_stats or DEFAULT_RGB_STATS))
        self.sets = (SampleDataset(self.train, transform), SampleDataset(self.val, transform))
        self.batch_size, self.k = batch_size, k

    @torch.no_grad()
    def __call__(self, encoder: nn.Module, device: torch.device) -> dict[str, float]:
        """``{"knn_top1": ...}`` of ``encoder``'s embeddings (its train / eval mode is restored)."""
        was_training = encoder.training
        encoder.eval()
        try:
            (train_x, train_y), (val_x, val_y) = (_embed(encoder, ds, self.batch_size, device) for ds in self.sets)
        finally:
            encoder.train(was_training)
        num_classes = len(self.train.class_to_idx)
        scores = knn_predict(train_x, train_y, val_x, num_classes, k=self.k, temperature=DEFAULT_TEMPERATURE)
        top1 = float((torch.from_numpy(scores).argmax(dim=1) == val_y).float().mean())
        return {"knn_top1": top1}


def _embed(
    encoder: nn.Module, dataset: SampleDataset, batch_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    rows, labels = [], []
    for images, y in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        rows.append(encoder.embedding(images.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(rows), torch.cat(labels)
