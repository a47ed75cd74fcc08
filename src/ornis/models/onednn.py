"""CPU inference through oneDNN: linear layers with the bias (and an MLP's GELU) fused into the matmul.

``nn.Linear`` on the CPU calls MKL's ``addmm``, which first copies the broadcast bias into the output and then adds
the product to it; the MLP's GELU is one more pass over the widest activation. oneDNN's ``linear_pointwise`` kernel
(the one inductor emits for CPU) adds the bias and applies the GELU while it writes the product. Measured on 2 CPU
cores (AVX-512, torch 2.14.1): a HieraDet first-stage MLP (25,088 tokens, 96 -> 384 -> 96) 49 -> 33 ms in fp32 and
18.4 -> 13.8 ms in bf16 (against autocast), later-stage MLPs 6-15 % faster, other linear layers 1-13 % faster. fp32
outputs differ from ``addmm``'s by at most ~3e-6 (float rounding, the order of the sums), as two BLAS libraries do.

The kernel has no backward, so it runs only where nothing records gradients and nothing traces: gradients off, a
plain ``nn.Linear`` without hooks on an x86 CPU, fp32 weights and input without autocast, or bf16 weights (alone or
under CPU autocast to bf16, the bf16 fast path) on a CPU with bf16 kernels, no ``torch.compile`` / export / jit
tracing / FX / dispatch mode (FLOP counters, fake tensors) active, and ``torch.backends.mkldnn.enabled``. Everywhere
else the layers run as PyTorch's. ``enabled(False)`` switches it off for a block, process-wide (not per thread):
benchmarks compare both, and tests that compare compiled graphs with eager results exactly use it.
"""

from __future__ import annotations

import contextlib
import platform
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

# is_fx_tracing also answers for torch.export (and warns that it does); the newer name asks about FX alone
_fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing", torch.fx._symbolic_trace.is_fx_tracing)
# x86 only: that is where the kernels were measured faster (ARM builds route oneDNN through other libraries)
_AVAILABLE = (
    platform.machine().lower() in ("x86_64", "amd64")
    and torch.backends.mkldnn.is_available()
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")
)
# AVX-512-BF16 / AMX: bf16 kernels rather than emulation
_BF16 = (
    _AVAILABLE
    and hasattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported")
    and torch.ops.mkldnn._is_mkldnn_bf16_supported()
)
_FLOATS = (torch.float32, torch.bfloat16)
_enabled = True


@contextlib.contextmanager
def enabled(on: bool) -> Iterator[None]:
    """Use the oneDNN kernels (``True``, the default) or PyTorch's own layers inside the block."""
    global _enabled
    before, _enabled = _enabled, on
    try:
        yield
    finally:
        _enabled = before


def _tracing() -> bool:
    return (
        torch.jit.is_tracing()
        or torch.compiler.is_compiling()
        or torch.onnx.is_in_onnx_export()
        or _fx_tracing()
        or _get_current_dispatch_mode() is not None
    )


def kernel_dtype(x: torch.Tensor, fc: nn.Module) -> torch.dtype | None:
    """The dtype in which ``fc`` (a plain ``nn.Linear``) can run on ``x`` through oneDNN, or ``None`` where it must
    run as PyTorch's (module docstring): float32, or bfloat16 for bf16 weights (on their own or under CPU autocast
    to bf16, as ``prepare_for_inference(..., "bf16")`` runs them) where the CPU has bf16 kernels."""
    if not (_AVAILABLE and _enabled and torch.backends.mkldnn.enabled) or torch.is_grad_enabled():
        return None
    if type(x) is not torch.Tensor or x.device.type != "cpu" or type(fc) is not nn.Linear or _tracing():
        return None
    module = nn.modules.module
    if any((fc._forward_hooks, fc._forward_pre_hooks, module._global_forward_hooks, module._global_forward_pre_hooks)):
        return None
    weight = fc.weight.dtype
    if torch.is_autocast_enabled("cpu"):
        autocast_bf16 = torch.get_autocast_dtype("cpu") == torch.bfloat16 and x.dtype in _FLOATS
        return torch.bfloat16 if autocast_bf16 and weight == torch.bfloat16 and _BF16 else None
    return weight if x.dtype == weight and (weight == torch.float32 or (weight == torch.bfloat16 and _BF16)) else None


def _pointwise(x: torch.Tensor, fc: nn.Linear, post_op: str, dtype: torch.dtype) -> torch.Tensor:
    algorithm = "none" if post_op == "gelu" else ""
    return torch.ops.mkldnn._linear_pointwise(x.to(dtype), fc.weight, fc.bias, post_op, [], algorithm)


def linear(fc: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``fc(x)``, through oneDNN where it can (``kernel_dtype``)."""
    dtype = kernel_dtype(x, fc)
    return fc(x) if dtype is None else _pointwise(x, fc, "none", dtype)


def linear_gelu(fc: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(fc(x))`` for an exact (erf) ``nn.GELU``, fused through oneDNN where it can (``kernel_dtype``)."""
    dtype = kernel_dtype(x, fc) if type(act) is nn.GELU and act.approximate == "none" else None
    return act(fc(x)) if dtype is None else _pointwise(x, fc, "gelu", dtype)
