"""The DINO projection head: an MLP to a bottleneck, L2 normalisation, and a weight-normalised linear layer to K
prototype scores (DINO, Caron et al., 2021; the same head in DINOv2)."""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn


class PrototypeLayer(nn.Module):
    """Bias-free linear layer with weight normalisation (``W = g * v / ||v||`` per prototype), g starting at 1.

    Written out rather than through ``nn.utils.parametrizations`` so the teacher's EMA, deep copies and
    checkpoints see two plain parameters. ``v`` starts as upstream's ``nn.Linear`` does (DINOv2 builds the layer
    after its trunc-normal init of the MLP, so it keeps PyTorch's default: uniform in +-1/sqrt(in_dim), rows of norm
    ~0.58), which sets the scale of the first updates. DINO keeps the prototypes fixed for the first epoch through a
    zero learning rate for this layer's parameter group (the recipe's ``param_groups``), not here.
    """

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.weight_v = nn.Parameter(torch.empty(out_dim, in_dim))
        self.weight_g = nn.Parameter(torch.ones(out_dim, 1))
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))  # nn.Linear's own init, as upstream

    def weight(self) -> torch.Tensor:
        """The normalised weight ``g * v / ||v||``, (out_dim, in_dim)."""
        return self.weight_g * self.weight_v / torch.linalg.vector_norm(self.weight_v, dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Prototype scores (N, out_dim)."""
        return F.linear(x, self.weight())


class DINOHead(nn.Module):
    """MLP (``num_layers`` linear layers with GELU between, the last to ``bottleneck_dim``), L2 normalisation,
    then prototype scores. ``forward`` returns (N, out_dim) logits."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a DINO head needs at least 1 layer, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.last_layer = PrototypeLayer(bottleneck_dim, out_dim)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, out_dim) prototype scores."""
        x = self.mlp(x)
        # A larger eps in half precision: 1e-12 underflows to 0 there
        x = F.normalize(x, dim=-1, eps=1e-6 if x.dtype == torch.float16 else 1e-12)
        return self.last_layer(x)
