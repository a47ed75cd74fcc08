"""Behaviour every family shares through ``ornis.models.layers.run_stages``."""

from __future__ import annotations

import pytest
import torch

import ornis

# Tiny configs of each family (64 px input)
FAMILIES = {
    "vit_t16": {"num_layers": 3},
    "hiera_abswin_tiny": {"depths": [1, 1, 2, 1], "embed_dim": 32, "num_heads": 1},
    "hieradet_tiny": {"depths": [1, 1, 2, 1], "embed_dim": 32, "num_heads": 1, "global_att_blocks": [3]},
}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_gradient_checkpointing_gives_the_same_gradients(name: str) -> None:
    torch.manual_seed(0)
    net = ornis.build_model(name, num_classes=3, size=64, config={**FAMILIES[name], "drop_path_rate": 0.0})
    torch.nn.init.normal_(net.classifier.weight, std=0.1)  # ViT's head starts at zero: no gradient would flow
    x = torch.randn(2, 3, 64, 64)
    net(x).square().sum().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    assert sum(float(g.abs().sum()) for g in plain) > 0
    net.zero_grad()
    net.set_grad_checkpointing(True)
    net(x).square().sum().backward()
    for a, p in zip(plain, net.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-9)
