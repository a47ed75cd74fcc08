"""Compile-readiness: every forward traces into one graph (``fullgraph=True``), a changing batch size recompiles at
most once (the batch dimension turns dynamic), and the masked forwards need no host sync.

Graph breaks and recompiles are counted with a backend that only records the graphs dynamo hands it (no inductor),
so these tests measure the tracing, not the compiler; one slow test runs inductor for real. The five published
configs are traced on the meta device: their graphs are the same, and nothing is computed.
"""

from __future__ import annotations

import pytest
import torch

import ornis
from ornis.models import onednn
from ornis.models.capabilities import visible_cells

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def pytorch_layers():
    """Compiled graphs run PyTorch's own linear layers; the eager results they are compared with exactly run them too
    (eager CPU inference otherwise takes oneDNN's fused kernels, within ~3e-6: tests/test_onednn.py)."""
    with onednn.enabled(False):
        yield


SMALL = {  # one small variant per code path, at a size that exercises its windows / interpolation
    "hiera_abswin_tiny": 224,
    "hiera_tiny": 224,
    "hieradet_tiny": 224,
    "hieradet_d_tiny": 224,
    "flexivit_reg1_t16_rms_ls": 240,
    "vit_reg4_t14_nps_ls": 224,
}
SMALL_CONFIGS = {  # narrower still where the family allows it: tracing cost grows with depth, not width
    "hiera_abswin_tiny": {"depths": [1, 1, 2, 1]},
    "hiera_tiny": {"depths": [1, 1, 2, 1]},
    "hieradet_tiny": {"depths": [1, 2, 3, 1], "global_att_blocks": [4]},
    "hieradet_d_tiny": {"depths": [1, 2, 3, 1], "global_att_blocks": [4]},
    "flexivit_reg1_t16_rms_ls": {"num_layers": 2},
    "vit_reg4_t14_nps_ls": {"num_layers": 2},
}
CARDS = {  # the five published architectures at their card sizes
    "hieradet_d_small": 224,
    "hieradet_small": 224,
    "hiera_abswin_base": 224,
    "vit_reg4_l14_nps_ls": 518,
    "flexivit_reg1_s16_rms_ls": 240,
}
METHODS = ("forward", "forward_intermediates")  # forward runs embedding; forward_intermediates every stage map


class GraphCounter:
    """A torch.compile backend that runs each graph as it is and counts them."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return gm.forward


def small_model(name: str) -> ornis.models.Encoder:
    torch.manual_seed(0)
    return ornis.build_model(name, num_classes=5, size=SMALL[name], config=SMALL_CONFIGS[name]).eval()


@pytest.mark.parametrize("name", list(SMALL))
@pytest.mark.parametrize("method", METHODS)
def test_one_graph_and_one_recompile_for_batch_1_3_8(name: str, method: str) -> None:
    net = small_model(name)
    size = SMALL[name]
    torch._dynamo.reset()
    counter = GraphCounter()
    compiled = torch.compile(getattr(net, method), backend=counter, fullgraph=True)
    with torch.inference_mode():
        for batch in (1, 3, 8):
            x = torch.randn(batch, 3, size, size)
            out, expected = compiled(x), getattr(net, method)(x)
            first = out if isinstance(out, torch.Tensor) else next(iter(getattr(out, "maps", out).values()))
            want = (
                expected
                if isinstance(expected, torch.Tensor)
                else next(iter(getattr(expected, "maps", expected).values()))
            )
            torch.testing.assert_close(first, want, rtol=0, atol=0)
    # batch 1 is specialised, batch 3 compiles the dynamic-batch graph, batch 8 reuses it
    assert counter.graphs <= 2


def test_visible_cells_are_the_ascending_visible_indices() -> None:
    g = torch.Generator().manual_seed(0)
    hidden = torch.zeros(4, 49, dtype=torch.bool)
    for row in hidden:
        row[torch.randperm(49, generator=g)[:29]] = True
    expected = (~hidden).nonzero(as_tuple=True)[1].view(4, -1)
    assert torch.equal(visible_cells(hidden, 29), expected)
    assert torch.equal(visible_cells(hidden), expected)  # count read from the first row
    assert torch.equal(visible_cells(hidden.float(), 29), expected)  # a 0/1 float mask, as masked_encoding takes
    uneven = hidden.clone()
    uneven[0, (~uneven[0]).nonzero()[0]] = True
    with pytest.raises(
        ValueError, match=r"every row of the mask must hide as many cells; the rows hide \[30, 29, 29, 29\]"
    ):
        visible_cells(uneven)


def _mask(batch: int, cells: int, hide: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(batch, cells)
    for row in mask:
        row[torch.randperm(cells, generator=g)[:hide]] = 1.0
    return mask


def test_hiera_masked_encoding_without_host_sync_compiles_to_one_graph() -> None:
    net = small_model("hiera_abswin_tiny")
    x = torch.randn(2, 3, 224, 224)
    mask = _mask(2, 49, 29)
    torch._dynamo.reset()
    counter = GraphCounter()
    compiled = torch.compile(net.masked_encoding, backend=counter, fullgraph=True)
    with torch.inference_mode():
        outs, keep = compiled(x, mask, num_masked=29)
        ref_outs, ref_keep = net.masked_encoding(x, mask)  # the count read from the mask: the same result
    assert counter.graphs == 1
    assert torch.equal(keep, ref_keep) and keep.sum(1).tolist() == [20, 20]
    assert [tuple(o.shape) for o in outs] == [
        (2, 20, 8, 8, 96),
        (2, 20, 4, 4, 192),
        (2, 20, 2, 2, 384),
        (2, 20, 1, 1, 768),
    ]
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["hiera_abswin_tiny", "vit_reg4_t14_nps_ls"])
def test_masked_omission_with_a_known_count_compiles_to_one_graph(name: str) -> None:
    net = small_model(name)
    size = SMALL[name]
    cells = net.omission_layout((size, size)).grid
    n = cells[0] * cells[1]
    hidden = _mask(2, n, n // 2).bool()
    torch._dynamo.reset()
    counter = GraphCounter()
    compiled = torch.compile(net.masked_omission, backend=counter, fullgraph=True)
    x = torch.randn(2, 3, size, size)
    with torch.inference_mode():
        outs = compiled(x, hidden, num_hidden=n // 2)
        ref = net.masked_omission(x, hidden)
    assert counter.graphs == 1
    special = net.omission_layout((size, size)).special_tokens
    assert outs[-1].shape[:2] == (2, special + n - n // 2)
    for a, b in zip(outs, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CARDS))
def test_published_configs_trace_without_graph_breaks(name: str) -> None:
    size = CARDS[name]
    with torch.device("meta"):
        net = ornis.build_model(name, num_classes=10, size=size).eval()
        x = torch.empty(2, 3, size, size)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(net)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    torch._dynamo.reset()
    counter = GraphCounter()
    compiled = torch.compile(net.embedding, backend=counter, fullgraph=True)
    for batch in (1, 3, 8):
        assert compiled(torch.empty(batch, 3, size, size, device="meta")).shape == (batch, net.embedding_size)
    assert counter.graphs <= 2


@pytest.mark.slow
def test_inductor_compiles_a_small_model_and_matches_eager() -> None:
    torch.manual_seed(0)
    net = ornis.build_model("hieradet_tiny", size=64, config={"depths": [1, 1, 1, 1], "global_att_blocks": [2]}).eval()
    torch._dynamo.reset()
    compiled = torch.compile(net.embedding, fullgraph=True)
    with torch.inference_mode():
        for batch in (1, 3):
            x = torch.randn(batch, 3, 64, 64)
            torch.testing.assert_close(compiled(x), net.embedding(x), rtol=1e-4, atol=1e-5)
