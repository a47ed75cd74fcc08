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
    torch.nn.init.normal_(net.classifier.weight, std=0.1)  # Hiera starts its head at 2e-5: gradients near rounding
    x = torch.randn(2, 3, 64, 64)
    net(x).square().sum().backward()
    plain = [p.grad.clone() for p in net.parameters()]
    assert sum(float(g.abs().sum()) for g in plain) > 0
    net.zero_grad()
    net.set_grad_checkpointing(True)
    net(x).square().sum().backward()
    for a, p in zip(plain, net.parameters()):
        assert torch.allclose(a, p.grad, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", ["vit_t16", "hieradet_tiny"])
def test_a_new_head_sends_the_backbone_a_gradient(name: str) -> None:
    """A new head starts random (std 0.02), not at zero: a zero head's gradient reaches the backbone only along
    the embeddings' mean, so the stem would get exactly nothing on the first step and a random-init ViT, whose
    embeddings start alike, stayed at ln 10 for 200 steps on the digits. Fine-tuning's replaced head starts the same."""
    torch.manual_seed(0)
    net = ornis.build_model(name, num_classes=10, size=64, config=FAMILIES[name])
    for _ in range(2):  # as built, then as replaced for fine-tuning
        assert float(net.classifier.weight.detach().std()) == pytest.approx(0.02, rel=0.15)
        assert float(net.classifier.bias.detach().abs().max()) == 0.0
        net.zero_grad()
        x = torch.randn(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        torch.nn.functional.cross_entropy(net(x), torch.arange(4)).backward()
        stem = next(p for n, p in net.named_parameters() if n.startswith(("conv_proj", "patch_embed", "stem")))
        assert stem.grad is not None and float(stem.grad.norm()) > 1e-4
        net.reset_classifier(10)
