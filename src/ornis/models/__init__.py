"""Encoder families and their registry. Importing this registers every variant."""

from ornis.models import hiera, hieradet, vit  # noqa: F401  (registers the variants)
from ornis.models.base import Encoder, Features
from ornis.models.capabilities import MaskedTokenOmission, MaskedTokenRetention, UnsupportedEncoderError
from ornis.models.registry import ModelSpec, build_model, get_model_spec, list_models, register_model

__all__ = [
    "Encoder",
    "Features",
    "MaskedTokenOmission",
    "MaskedTokenRetention",
    "ModelSpec",
    "UnsupportedEncoderError",
    "build_model",
    "get_model_spec",
    "list_models",
    "register_model",
]
