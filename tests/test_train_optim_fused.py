"""The speed-ups of the DINOv2 step keep its numbers: the teacher's foreach EMA is bit-identical to the per-tensor
lerp, and the loop's fused CPU AdamW matches PyTorch's default AdamW to float32 rounding."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ornis.train.dino_v2.meta_arch import ema_update


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4), nn.BatchNorm1d(4))


def test_foreach_ema_is_bit_identical_to_the_per_tensor_lerp() -> None:
    student, teacher = _net(), _net()
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
        student[4].running_mean.add_(1.5)
    expected = copy.deepcopy(teacher)
    with torch.no_grad():
        for t, s in zip(expected.parameters(), student.parameters()):
            t.lerp_(s, 1.0 - 0.9937)
        for t, s in zip(expected.buffers(), student.buffers()):
            t.copy_(s)
    ema_update(teacher, student, 0.9937)
    for (name, got), want in zip(teacher.state_dict().items(), expected.state_dict().values()):
        assert torch.equal(got, want), name


def test_fused_cpu_adamw_matches_the_default_to_rounding() -> None:
    runs = []
    for fused in (None, True):
        net = _net()
        decay = [p for p in net.parameters() if p.ndim > 1]
        rest = [p for p in net.parameters() if p.ndim <= 1]
        groups = [{"params": decay, "weight_decay": 0.04}, {"params": rest, "weight_decay": 0.0, "lr": 0.0}]
        opt = torch.optim.AdamW(groups, lr=1e-2, betas=(0.9, 0.999), fused=fused)
        torch.manual_seed(1)
        for _ in range(20):  # the same gradients for both (no feedback through the weights): rounding only
            for p in net.parameters():
                p.grad = torch.randn_like(p) * 1e-2
            opt.step()
        runs.append([p.detach().clone() for p in net.parameters()])
    for default, fused in zip(*runs):
        torch.testing.assert_close(fused, default, rtol=1e-5, atol=1e-6)
    # the lr-0 group (the frozen prototypes' case) does not move under either
    assert torch.equal(runs[1][1], _net()[0].bias.detach())
