"""ornis: pretrained vision-transformer image encoders.

The model-card API::

    import ornis
    from ornis.inference.classification import infer_image

    net, model_info = ornis.load_pretrained_model("flexivit_reg1_s16_rms_ls_dino-v2-il-all", inference=True)
    size = ornis.get_size_from_signature(model_info.signature)
    transform = ornis.classification_transform(size, model_info.rgb_stats)
    out, embedding = infer_image(net, "bird.jpeg", transform, return_embedding=True)

``load_pretrained_model`` also opens exported ``.pts`` / ``.pt2`` files (as ``ExportedModel``); importing
``ornis.export`` here registers that reader, so it is in place whichever ornis module is imported first.
"""

from ornis._version import __version__
from ornis.data.transforms import classification_transform
from ornis.errors import (
    CheckpointFormatError,
    ChecksumError,
    OrnisError,
    StateDictMismatchError,
    UnknownModelError,
    WeightsNotFoundError,
)
from ornis.export import ExportedModel, load_exported
from ornis.loading import ModelInfo, load_pretrained_model
from ornis.models import Encoder, Features, build_model, list_models
from ornis.weights.checkpoint import get_size_from_signature, read_checkpoint, save_model
from ornis.weights.manifest import list_pretrained_models

__all__ = [
    "CheckpointFormatError",
    "ChecksumError",
    "Encoder",
    "ExportedModel",
    "Features",
    "ModelInfo",
    "OrnisError",
    "StateDictMismatchError",
    "UnknownModelError",
    "WeightsNotFoundError",
    "__version__",
    "build_model",
    "classification_transform",
    "get_size_from_signature",
    "list_models",
    "list_pretrained_models",
    "load_exported",
    "load_pretrained_model",
    "read_checkpoint",
    "save_model",
]
