"""The inference fast path: run an encoder in bf16 or int8, optionally compiled, behind the encoder's own API.

``prepare_for_inference(net, precision, compile)`` returns an ``InferenceModel``: ``embedding``, ``forward``,
``classify``, ``detection_features`` and ``forward_intermediates`` run in the chosen precision and give float32
outputs; every other attribute (``size``, ``name``, ``embedding_size``, ...) is the encoder's.

Modes (``PRECISIONS``; what each costs in accuracy against fp32 is ``PRECISION_ACCURACY``):

fp32
    The encoder as it is (the published numbers). CPU inference runs its linear layers through oneDNN with the bias
    and the MLP's GELU fused (``ornis.models.onednn``; within ~1e-6 relative of PyTorch's own layers).
bf16
    ``torch.autocast`` to bfloat16 (matmuls, convolutions and attention in bf16; norms, softmax statistics and
    position-embedding interpolation stay fp32), with the linear and convolution weights cast to bf16 once: autocast
    would cast the same values on every call (its weight cache only works with autograd on). Fast where the CPU
    has AVX-512-BF16 / AMX or on a GPU.
int8
    Dynamic int8 quantisation of every ``nn.Linear`` but the classifier head (weights per output channel int8,
    activations quantised per call): ``torch.ao.quantization.quantize_dynamic`` on fbgemm's VNNI kernels. CPU only.
    torchao (0.18.0, ``Int8DynamicActivationInt8WeightConfig``) was measured first, as the issue prefers, on a ViT-S
    MLP (1808 tokens) on this 2-core AVX-512 CPU with torch 2.14.1: eager it ran 2.6x *slower* than fp32, compiled
    1.3x slower, and compiled with inductor's ``freezing`` 1.6x faster; ``quantize_dynamic`` ran 2.3-2.8x faster
    than fp32 eager with no compilation at all, so the fast path uses it (torchao stays an option to revisit).

``compile=True`` wraps each method in ``torch.compile`` (inductor), compiled on first use per method; the batch
dimension becomes dynamic after the first change of batch size (one recompile).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

Precision = Literal["fp32", "bf16", "int8"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")

# Measured with benchmarks/throughput.py --fast-path on 2 CPU cores (torch 2.14.1): embedding cosine against the
# same model in fp32, smallest over 8 scikit-image photos, for flexivit_reg1_s16_rms_ls, hieradet_small,
# hieradet_d_small and hiera_abswin_base with random weights (layer scale set to 1, so that every block counts), and
# for the shipped ornis_shapes_vit_tiny (trained weights) on its 16 samples and the photos, with its top-1
# (benchmarks/results/cpu_fast_path.json). ViT-L/14 at 518 was not measured. tests/test_precision.py checks the
# bounds stated here
PRECISION_ACCURACY: dict[str, str] = {
    "fp32": "the published numbers (CPU inference within 1e-6 relative, oneDNN's fused linear layers)",
    "bf16": "embedding cosine >= 0.9999 against fp32 on real photos (measured 0.99994-0.99997); top-1 unchanged",
    "int8": "embedding cosine >= 0.995 against fp32 on real photos (measured 0.9955-0.9992); top-1 unchanged; CPU",
}

_METHODS = ("forward", "embedding", "classify", "detection_features", "forward_intermediates")


def check_precision(precision: str) -> str:
    """``precision`` if it is one of ``PRECISIONS``, else ``ValueError`` naming it and the choices."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def _to_float32(out: Any) -> Any:
    if isinstance(out, torch.Tensor):
        return out.float() if out.is_floating_point() else out
    if isinstance(out, dict):
        return {k: _to_float32(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(_to_float32(v) for v in out)
    if hasattr(out, "__dataclass_fields__"):  # Features
        return type(out)(**{k: _to_float32(getattr(out, k)) for k in out.__dataclass_fields__})
    return out


def quantize_linear_int8(net: nn.Module, skip: tuple[str, ...] = ("classifier",)) -> nn.Module:
    """Replace every ``nn.Linear`` of ``net`` (in place) outside the top-level modules named in ``skip`` by fbgemm's
    dynamically quantised int8 linear; returns ``net``."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise RuntimeError(
            f"int8 needs the fbgemm quantised engine (x86); this build has {torch.backends.quantized.supported_engines}"
        )
    torch.backends.quantized.engine = "fbgemm"
    names = {n for n, m in net.named_modules() if isinstance(m, nn.Linear) and n.split(".", 1)[0] not in skip}
    with warnings.catch_warnings():
        # torch.ao.quantization warns that it moves to torchao; torchao's CPU int8 is slower here (module docstring)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        return torch.ao.quantization.quantize_dynamic(net, names, dtype=torch.qint8, inplace=True)


def _cast_matmul_weights(net: nn.Module, dtype: torch.dtype) -> None:
    for m in net.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            m.to(dtype)


class InferenceModel(nn.Module):
    """An encoder run in one precision (module docstring); outputs are float32. Attributes other than the methods
    come from the encoder."""

    def __init__(self, net: nn.Module, precision: str, compile: bool) -> None:
        super().__init__()
        self.net = net
        self.precision = precision
        self.compiled = compile
        self._compiled: dict[str, Callable] = {}

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")  # absent while copy / pickle rebuild the object
            if not modules or "net" not in modules:
                raise
            return getattr(modules["net"], name)

    def _run(self, method: str, *args: Any, **kwargs: Any) -> Any:
        fn = getattr(self.net, method)
        if self.compiled:
            if method not in self._compiled:
                self._compiled[method] = torch.compile(fn, fullgraph=self.precision != "int8")
            fn = self._compiled[method]
        device = next(self.net.parameters()).device.type
        enabled = self.precision == "bf16"
        with torch.autocast(device, dtype=torch.bfloat16, enabled=enabled):
            out = fn(*args, **kwargs)
        return _to_float32(out) if enabled else out

    def forward(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """Logits, float32."""
        return self._run("forward", x, **kwargs)

    def embedding(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The pooled embedding, float32."""
        return self._run("embedding", x, **kwargs)

    def classify(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits from an embedding (the head, kept in fp32 by int8)."""
        return self._run("classify", embedding)

    def detection_features(self, x: torch.Tensor, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The encoder's ``detection_features``, float32."""
        return self._run("detection_features", x, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """The encoder's ``forward_intermediates``, float32."""
        return self._run("forward_intermediates", x, *args, **kwargs)

    def extra_repr(self) -> str:
        """Precision and compilation in ``repr``."""
        return f"precision={self.precision!r}, compile={self.compiled}"


def prepare_for_inference(
    net: nn.Module, precision: str = "fp32", compile: bool = False, inplace: bool = False
) -> nn.Module:
    """The encoder ready to run in ``precision`` (``"fp32"``, ``"bf16"`` or ``"int8"``), compiled with
    ``torch.compile`` if asked: ``net`` itself for fp32 without compilation, else an ``InferenceModel``.

    The model is put in eval mode. bf16 and int8 change weights, so they work on a copy unless ``inplace``. int8 is
    CPU only (``ValueError`` for a model on another device). Accuracy against fp32: ``PRECISION_ACCURACY``.
    """
    check_precision(precision)
    net.eval()
    if precision == "fp32" and not compile:
        return net
    if precision != "fp32" and not inplace:
        net = copy.deepcopy(net)
    if precision == "bf16":
        _cast_matmul_weights(net, torch.bfloat16)
    elif precision == "int8":
        device = next(net.parameters()).device
        if device.type != "cpu":
            raise ValueError(f"precision 'int8' runs on the CPU only; the model is on {device}")
        quantize_linear_int8(net)
    return InferenceModel(net, precision, compile)
