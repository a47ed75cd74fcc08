"""Weights: the published checkpoint format, the manifest of published weights, the cache and converters."""

from ornis.weights.checkpoint import Checkpoint, load_state, read_checkpoint, save_model, write_checkpoint
from ornis.weights.manifest import MANIFEST, PretrainedWeights, get_weights, list_pretrained_models

__all__ = [
    "MANIFEST",
    "Checkpoint",
    "PretrainedWeights",
    "get_weights",
    "list_pretrained_models",
    "load_state",
    "read_checkpoint",
    "save_model",
    "write_checkpoint",
]
