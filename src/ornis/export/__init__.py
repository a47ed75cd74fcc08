"""Export an encoder for deployment: TorchScript (``.pts``), ``torch.export`` programs (``.pt2``) and ONNX (``.onnx``).

The exported graph computes one output of the encoder, chosen at export time: the ``embedding`` (B, D), the
``logits`` (B, num_classes) or the detection ``features`` (one (B, C, h, w) map per stage, named as
``net.return_stages``). The batch size is always dynamic. The input size is fixed (the size given, by default the
model's) unless ``dynamic_size=True``, which ``pt2`` and ``onnx`` support for the ViT / FlexiViT family (inputs whose
sides are multiples of the patch size; position embeddings are interpolated in the graph). Not supported:

* ``pts`` with a dynamic size: TorchScript files are made by tracing, which records one run; every branch on the
  input size (e.g. "interpolate the position embeddings only for another grid") is frozen at the traced size.
* Hiera and HieraDet (``FIXED_SIZE_FAMILIES`` says why): one file per input size, with ``size=(H, W)``.

Every export is checked before it is kept: the file is written under a temporary name, loaded back, and run on
random batches beside the eager model; the worst difference (relative to the eager output's scale) must be within
``tolerance``, else the file is deleted and ``ExportCheckError`` raised. Only a checked file is renamed into place.

The files carry the checkpoint's metadata (``task``, ``class_to_idx``, ``signature``, ``rgb_stats``, ``network`` and
an ``export`` record), so ``load_exported(path)`` (and ``ornis.load_pretrained_model(path)``, to which this package
registers its reader) returns ``(ExportedModel, ModelInfo)``. ONNX files run with ``onnxruntime`` (not a dependency
of ornis): ``load_onnx_session(path)``.

Modules: ``request`` (what may be asked), ``head`` (what the graph computes), ``write`` (the three writers),
``check`` (the post-write parity check), ``read`` (loading back), ``metadata`` (what the files carry) and
``exporter`` (``export_model``, which runs them in order).
"""

from ornis.export.check import CheckResult, check_export
from ornis.export.exporter import ExportReport, export_model
from ornis.export.head import ExportHead
from ornis.export.metadata import META_KEYS, ExportMetadata, ExportRecord
from ornis.export.read import (
    ExportedModel,
    load_exported,
    load_onnx_session,
    read_export_metadata,
    sniff_export_format,
)
from ornis.export.request import (
    DEFAULT_CHECK_BATCH,
    DEFAULT_OUTPUT,
    DEFAULT_TOLERANCE,
    FIXED_SIZE_FAMILIES,
    FORMATS,
    OUTPUTS,
    ExportRequest,
    check_destination,
    dynamic_size_refusal,
    export_size,
    resolve_format,
)

__all__ = [
    "DEFAULT_CHECK_BATCH",
    "DEFAULT_OUTPUT",
    "DEFAULT_TOLERANCE",
    "FIXED_SIZE_FAMILIES",
    "FORMATS",
    "META_KEYS",
    "OUTPUTS",
    "CheckResult",
    "ExportHead",
    "ExportMetadata",
    "ExportRecord",
    "ExportReport",
    "ExportRequest",
    "ExportedModel",
    "check_destination",
    "check_export",
    "dynamic_size_refusal",
    "export_model",
    "export_size",
    "load_exported",
    "load_onnx_session",
    "read_export_metadata",
    "resolve_format",
    "sniff_export_format",
]
