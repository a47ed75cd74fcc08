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


class BatchStandardise(nn.BatchNorm1d):
    """Batch normalisation of a head's hidden layer (DINO's ``use_bn`` head) that always uses the statistics of the
    rows it is given, in the teacher (eval mode) as in the student, and keeps no running statistics, so the EMA,
    checkpoints and resume see only its affine parameters. Fewer than two rows carry no statistics: they map to the
    bias (a single row's deviation from its own mean is zero)."""

    def __init__(self, width: int) -> None:
        super().__init__(width, track_running_stats=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, width) -> (N, width), standardised over the N rows, then scaled and shifted."""
        if x.shape[0] < 2:
            return x * 0.0 + self.bias
        return super().forward(x)


class DINOHead(nn.Module):
    """MLP (``num_layers`` linear layers with GELU between, the last to ``bottleneck_dim``), L2 normalisation,
    then prototype scores. ``forward`` returns (N, out_dim) logits.

    ``batch_norm`` puts ``BatchStandardise`` after each hidden linear layer (DINO's and DINOv2's ``use_bn``). It
    matters when the backbone's embeddings share a large common part, as a randomly initialised ViT's do on
    low-variety images (pairwise cosine ~0.98 on 32 px digits): without it the prototype scores vary across images
    by ~0.01, so the centred teacher targets are uniform (entropy ~ln K) from the first step and the DINO term
    carries no signal; with it the targets start sharp (entropy 5.98 against ln K = 6.93 at teacher temperature
    0.04, 1,024 prototypes). The statistics are per call: call the head once per kind of rows."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        batch_norm: bool = False,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"a DINO head needs at least 1 layer, got {num_layers}")
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < num_layers - 1:
                layers.extend([BatchStandardise(b), nn.GELU()] if batch_norm else [nn.GELU()])
        self.mlp = nn.Sequential(*layers)
        self.batch_norm = batch_norm
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
