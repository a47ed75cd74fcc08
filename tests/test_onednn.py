"""fp32 CPU inference through oneDNN (``ornis.models.onednn``): the fused kernels run where nothing records
gradients or traces, give PyTorch's numbers to float rounding, and step aside for autograd, tracing, FLOP counting,
hooks, autocast and quantised layers."""

from __future__ import annotations

import pytest
import torch
from conftest import scale_err
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import ornis
from ornis.models import onednn
from ornis.models.layers import Mlp
from ornis.models.precision import prepare_for_inference

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not onednn._AVAILABLE, reason="this torch build has no oneDNN linear kernel"),
]

KERNEL = "mkldnn::_linear_pointwise"
SMALL = {
    "hieradet_tiny": ({"depths": [1, 2, 3, 1], "global_att_blocks": [4]}, 224),
    "hiera_abswin_tiny": ({"depths": [1, 1, 2, 1]}, 224),
    "vit_reg4_t14_nps_ls": ({"num_layers": 2}, 224),
}


def kernel_calls(fn, *args) -> tuple[int, object]:
    """How many times ``fn(*args)`` ran the oneDNN linear kernel, and what it returned."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        out = fn(*args)
    return sum(e.count for e in prof.key_averages() if e.key == KERNEL), out


def small(name: str) -> nn.Module:
    torch.manual_seed(0)
    config, _ = SMALL[name]
    return ornis.build_model(name, num_classes=5, config=config).eval()


@pytest.mark.parametrize("name", list(SMALL))
def test_inference_takes_the_kernels_and_keeps_the_numbers(name: str) -> None:
    net = small(name)
    size = SMALL[name][1]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    linears = sum(type(m) is nn.Linear for m in net.modules()) - 1  # every linear layer but the classifier
    with torch.inference_mode():
        calls, fast = kernel_calls(net.embedding, x)
        with onednn.enabled(False):
            plain_calls, plain = kernel_calls(net.embedding, x)
    # Each MLP's fc1 + GELU is one call, so every linear layer is one call
    assert calls == linears and plain_calls == 0
    assert scale_err(fast, plain) < 1e-5


def test_gradients_run_pytorchs_layers_and_backpropagate() -> None:
    net = small("hieradet_tiny")
    x = torch.randn(2, 3, 224, 224)
    calls, out = kernel_calls(net.embedding, x)
    assert calls == 0
    out.sum().backward()
    assert net.body[0][0].mlp[0].weight.grad.abs().sum() > 0


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # the size checks trace as constants: expected here
def test_tracing_and_flop_counting_see_pytorchs_layers() -> None:
    net = small("vit_reg4_t14_nps_ls")
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        with onednn.enabled(False), FlopCounterMode(display=False) as plain:
            net.embedding(x)
        with FlopCounterMode(display=False) as counted:
            net.embedding(x)
    assert counted.get_total_flops() == plain.get_total_flops() > 0
    with torch.no_grad():
        traced = torch.jit.trace_module(net, {"embedding": x}, check_trace=False)
    graph = str(traced.embedding.inlined_graph)
    assert "mkldnn" not in graph and "aten::linear" in graph
    with torch.no_grad():
        fx_graph = str(torch.fx.symbolic_trace(Mlp(8, 16).eval()).graph)
    assert "mkldnn" not in fx_graph and fx_graph.count("call_module") == 5


def test_compiled_inference_is_one_graph_with_the_kernels_on() -> None:
    """torch.compile traces the kernels' checks without a graph break (tests/test_compile.py runs with them off)."""
    net = small("hieradet_tiny")
    x = torch.randn(2, 3, 224, 224)
    torch._dynamo.reset()
    with torch.inference_mode():
        compiled = torch.compile(net.embedding, backend="eager", fullgraph=True)(x)
        eager = net.embedding(x)
        explained = torch._dynamo.explain(net.embedding)(x)
    assert explained.graph_break_count == 0 and explained.graph_count == 1
    assert scale_err(compiled, eager) < 1e-5


def test_hooks_autocast_and_quantised_layers_are_honoured() -> None:
    mlp = Mlp(16, 64).eval()
    x = torch.randn(4, 16)
    seen = []
    with torch.no_grad():
        handle = mlp[0].register_forward_hook(lambda module, args, out: seen.append(out.shape))
        calls, _ = kernel_calls(mlp, x)
        assert seen == [(4, 64)] and calls == 1  # fc1 (hooked) ran as itself, fc2 through oneDNN
        handle.remove()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert kernel_calls(mlp, x)[0] == 0  # fp32 weights under autocast: PyTorch casts them per call
        torch.backends.mkldnn.enabled = False  # not flags(): it also sets TF32 options and warns about Intel GPUs
        try:
            assert kernel_calls(mlp, x)[0] == 0
        finally:
            torch.backends.mkldnn.enabled = True
        assert kernel_calls(mlp.double(), x.double())[0] == 0  # fp32 only
    int8 = prepare_for_inference(small("vit_reg4_t14_nps_ls"), "int8")
    with torch.inference_mode():
        assert kernel_calls(int8.embedding, torch.randn(1, 3, 224, 224))[0] == 0


@pytest.mark.skipif(not onednn._BF16, reason="this CPU has no bf16 kernels")
def test_bf16_fast_path_takes_the_kernels_and_keeps_its_accuracy() -> None:
    net = small("hieradet_tiny")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    bf16 = prepare_for_inference(net, "bf16")
    with torch.inference_mode():
        want = net.embedding(x)
        calls, fast = kernel_calls(bf16.embedding, x)
        with onednn.enabled(False):
            autocast = bf16.embedding(x)
    assert calls == sum(type(m) is nn.Linear for m in net.modules()) - 1
    assert fast.dtype == torch.float32
    cos = torch.nn.functional.cosine_similarity
    # bf16 rounding either way: both as close to fp32 as PRECISION_ACCURACY states, and to each other
    assert cos(fast, want).min() > 0.9999 and cos(autocast, want).min() > 0.9999 and cos(fast, autocast).min() > 0.9999


def test_mlp_matches_pytorch_to_float_rounding() -> None:
    torch.manual_seed(0)
    mlp = Mlp(96, 384).eval()
    x = torch.randn(2, 56, 56, 96)  # a HieraDet first-stage map, channels last
    with torch.no_grad():
        fast = mlp(x)
        want = mlp[3](mlp[1](mlp[0](x)))
    assert fast.shape == want.shape and scale_err(fast, want) < 1e-5
