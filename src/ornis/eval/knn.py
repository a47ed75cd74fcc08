"""Weighted k-NN classification on frozen embeddings, as DINO evaluates its features (Caron et al. 2021, sec. 4.1):
cosine similarity, the k most similar training rows vote for their class with weight ``exp(sim / T)``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ornis.errors import EmbeddingsFormatError
from ornis.eval.labels import EmbeddingTable
from ornis.eval.metrics import ClassificationReport, classification_report

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def knn_predict(
    train_embeddings: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    query_embeddings: np.ndarray | torch.Tensor,
    num_classes: int,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    exclude_self: bool = False,
    chunk_size: int = 1024,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Class scores (Q, C): the sum of ``exp(cos / T)`` over each query's ``k`` nearest training rows per class.

    ``exclude_self``: the queries *are* the training rows (same order), and a row must not vote for itself
    (leave-one-out evaluation of a single labelled set).
    """
    train = F.normalize(torch.as_tensor(train_embeddings, dtype=torch.float32, device=device), dim=1)
    labels = torch.as_tensor(train_labels, dtype=torch.long, device=device)
    queries = F.normalize(torch.as_tensor(query_embeddings, dtype=torch.float32, device=device), dim=1)
    if exclude_self and queries.shape[0] != train.shape[0]:
        raise ValueError("exclude_self needs the queries to be the training rows")
    k = min(k, train.shape[0] - int(exclude_self))
    if k < 1:
        raise ValueError("k-NN needs at least one training row besides the query")
    scores = torch.zeros(queries.shape[0], num_classes, dtype=torch.float32, device=device)
    for start in range(0, queries.shape[0], chunk_size):
        sim = queries[start : start + chunk_size] @ train.T
        if exclude_self:
            rows = torch.arange(sim.shape[0], device=device)
            sim[rows, rows + start] = -float("inf")
        top_sim, top_idx = sim.topk(k, dim=1)
        weights = (top_sim / temperature).exp()
        scores[start : start + chunk_size].scatter_add_(1, labels[top_idx], weights)
    return scores.cpu().numpy()


def evaluate_knn(
    train: EmbeddingTable,
    test: EmbeddingTable | None = None,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    device: torch.device | str = "cpu",
) -> ClassificationReport:
    """k-NN accuracy of ``test`` against ``train``; without ``test``, leave-one-out over ``train``."""
    if train.labels is None or train.class_names is None:
        raise EmbeddingsFormatError("k-NN evaluation needs a labelled training set")
    names = train.class_names
    if test is None:
        scores = knn_predict(
            train.embeddings,
            train.labels,
            train.embeddings,
            len(names),
            k=k,
            temperature=temperature,
            exclude_self=True,
            device=device,
        )
        truth = train.labels
        protocol = "leave-one-out"
    else:
        if test.labels is None:
            raise EmbeddingsFormatError("k-NN evaluation needs a labelled test set")
        if test.class_names != names:
            raise EmbeddingsFormatError("the test set's labels must be encoded with the training set's class names")
        if test.embeddings.shape[1] != train.embeddings.shape[1]:
            raise EmbeddingsFormatError(
                f"embedding sizes differ: train {train.embeddings.shape[1]}, test {test.embeddings.shape[1]}"
            )
        scores = knn_predict(
            train.embeddings, train.labels, test.embeddings, len(names), k=k, temperature=temperature, device=device
        )
        truth = test.labels
        protocol = "train/test"
    return classification_report(scores, truth, names, {"k": k, "temperature": temperature, "protocol": protocol})
