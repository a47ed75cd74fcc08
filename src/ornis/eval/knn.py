"""Weighted k-NN classification on frozen embeddings, as DINO evaluates its features (Caron et al. 2021, sec. 4.1):
cosine similarity, the k most similar training rows vote for their class with weight ``exp(sim / T)``."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ornis.errors import EmbeddingsFormatError
from ornis.eval.labels import EmbeddingTable, check_classes, check_finite
from ornis.eval.metrics import ClassificationReport, check_positive_int, classification_report, dropped_details

DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07


def check_knn_arguments(k: int, temperature: float) -> None:
    """``ValueError`` naming the argument unless ``k`` is a positive integer and ``temperature`` a positive number
    (``inf``: every neighbour's vote weighs the same)."""
    check_positive_int("k", k)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not temperature > 0:  # also refuses NaN
        raise ValueError(f"temperature must be above 0, got {temperature!r}")


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
    (leave-one-out evaluation of a single labelled set). A query whose weights would overflow float32 (a very small
    ``temperature``) has them all divided by ``exp(best cos / T)``: its ranking of the classes stays the same.
    Rows holding NaN or Inf are not checked here (a training run's k-NN monitor must not die of them);
    ``evaluate_knn`` refuses them.
    """
    check_knn_arguments(k, temperature)
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
        overflow = ~weights.isfinite().all(dim=1)
        if overflow.any():
            weights[overflow] = ((top_sim[overflow] - top_sim[overflow, :1]) / temperature).exp()
        scores[start : start + chunk_size].scatter_add_(1, labels[top_idx], weights)
    return scores.cpu().numpy()


def evaluate_knn(
    train: EmbeddingTable,
    test: EmbeddingTable | None = None,
    *,
    k: int = DEFAULT_K,
    temperature: float = DEFAULT_TEMPERATURE,
    device: torch.device | str = "cpu",
    drop_non_finite: bool = False,
) -> ClassificationReport:
    """k-NN accuracy of ``test`` against ``train``; without ``test``, leave-one-out over ``train``.

    The training set needs at least two classes; rows with NaN or Inf embeddings are an ``EmbeddingsFormatError``
    unless ``drop_non_finite=True`` leaves them out (their count goes into the report's details).
    """
    check_knn_arguments(k, temperature)
    train = check_finite(train, drop_non_finite)
    check_classes(train, "k-NN evaluation")
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
            raise EmbeddingsFormatError(f"{test.name}: k-NN evaluation needs a labelled test set")
        test = check_finite(test, drop_non_finite)
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
    details = {"k": k, "temperature": temperature, "protocol": protocol, **dropped_details(train, test)}
    return classification_report(scores, truth, names, details)
