"""Evaluation and retrieval on frozen embeddings: k-NN and linear-probe accuracy, nearest-neighbour search."""

from ornis.eval.knn import evaluate_knn, knn_predict
from ornis.eval.labels import EmbeddingTable, read_embeddings
from ornis.eval.linear import evaluate_linear_probe
from ornis.eval.metrics import ClassificationReport, classification_report

__all__ = [
    "ClassificationReport",
    "EmbeddingTable",
    "classification_report",
    "evaluate_knn",
    "evaluate_linear_probe",
    "knn_predict",
    "read_embeddings",
]
