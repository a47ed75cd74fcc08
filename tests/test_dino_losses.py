"""DINOv2 loss parts checked against small examples computed independently (plain loops over NumPy float64),
and the edge cases where small batches break them: duplicate embeddings for KoLeo, overflowing logits and empty
prototypes for Sinkhorn-Knopp."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ornis.train.dino_v2.centering import (
    LogitQueue,
    SoftmaxCentering,
    sinkhorn_knopp,
    teacher_temperature,
)
from ornis.train.dino_v2.heads import BatchStandardise, DINOHead
from ornis.train.dino_v2.losses import dino_loss, ibot_loss, koleo_loss
from ornis.train.dino_v2.meta_arch import teacher_momentum
from ornis.train.dino_v2.multicrop import block_mask, mask_rng, sample_masks


def _log_softmax(row: np.ndarray) -> np.ndarray:
    m = row.max()
    return row - m - math.log(sum(math.exp(v - m) for v in row))


def _ce(target: np.ndarray, logits: np.ndarray, temp: float) -> float:
    log_p = _log_softmax(logits / temp)
    return -sum(float(t) * float(lp) for t, lp in zip(target, log_p))


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).float()


# -- DINO ------------------------------------------------------------------------------------------------------------
def test_dino_loss_matches_explicit_pairs() -> None:
    B, K, temp = 3, 5, 0.1
    students = [_rand(B, K, seed=i) for i in range(4)]  # 2 global views, then 2 local views
    teachers = [torch.softmax(_rand(B, K, seed=10 + t) / 0.04, dim=-1) for t in range(2)]
    got = float(dino_loss(students, teachers, temp))

    total, pairs = 0.0, 0
    for s in range(4):
        for t in range(2):
            if s == t:  # a global view is never its own target
                continue
            per_sample = [_ce(teachers[t][b].double().numpy(), students[s][b].double().numpy(), temp) for b in range(B)]
            total += sum(per_sample) / B
            pairs += 1
    assert pairs == 6
    assert got == pytest.approx(total / pairs, rel=1e-5)


def test_dino_loss_needs_a_pair_of_different_views() -> None:
    with pytest.raises(ValueError, match="pair"):
        dino_loss([_rand(2, 3)], [torch.softmax(_rand(2, 3), -1)])


# -- iBOT ------------------------------------------------------------------------------------------------------------
def test_ibot_loss_matches_per_view_means() -> None:
    views, N, K, temp = 4, 6, 5, 0.1
    masks = torch.zeros(views, N, dtype=torch.bool)
    masks[0, [0, 2, 3]] = True
    masks[2, [5]] = True  # views 1 and 3 unmasked: they count in the mean as zeros
    M = int(masks.sum())
    student = _rand(M, K, seed=1)
    teacher = torch.softmax(_rand(M, K, seed=2) / 0.04, dim=-1)
    weights = (1.0 / masks.sum(1, keepdim=True).clamp_min(1)).expand_as(masks)[masks]
    got = float(ibot_loss(student, teacher, weights, views, temp))

    rows = masks.nonzero().tolist()  # (view, patch) of each of the M rows, row-major
    per_view: dict[int, list[float]] = {}
    for r, (v, _) in enumerate(rows):
        per_view.setdefault(v, []).append(_ce(teacher[r].double().numpy(), student[r].double().numpy(), temp))
    expected = sum(sum(ces) / len(ces) for ces in per_view.values()) / views
    assert got == pytest.approx(expected, rel=1e-5)


def test_ibot_loss_without_masked_patches_is_zero_and_differentiable() -> None:
    student = torch.zeros(0, 5, requires_grad=True)
    loss = ibot_loss(student, torch.zeros(0, 5), torch.zeros(0), 4)
    loss.backward()
    assert float(loss.detach()) == 0.0


# -- KoLeo -----------------------------------------------------------------------------------------------------------
def _koleo_reference(x: np.ndarray, eps: float) -> float:
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), eps)
    total = 0.0
    for i in range(len(x)):
        nearest = min(float(np.linalg.norm(x[i] - x[j])) for j in range(len(x)) if j != i)
        total += -math.log(nearest + eps)
    return total / len(x)


def test_koleo_matches_brute_force_nearest_neighbours() -> None:
    x = _rand(7, 4, seed=3)
    assert float(koleo_loss(x)) == pytest.approx(_koleo_reference(x.double().numpy(), 1e-8), rel=1e-5)


def test_koleo_with_exact_duplicates_is_finite_with_finite_gradients() -> None:
    x = _rand(32, 16, seed=4)
    x[5] = x[9]  # an exact duplicate triple in a batch of 32
    x[20] = x[9]
    x.requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(x.grad).all()
    # the three duplicates each add -log(eps) (their neighbour is at distance 0); the rest is the ordinary loss
    ref = _koleo_reference(x.detach().double().numpy(), 1e-8)
    assert float(loss.detach()) == pytest.approx(ref, rel=1e-5)
    assert float(loss.detach()) > 3 * -math.log(1e-8) / 32


def test_koleo_with_duplicates_after_normalisation_has_finite_gradients() -> None:
    # The same direction at another length: equal only up to float32 rounding once normalised
    x = _rand(32, 16, seed=11)
    x[20] = x[9] * 3.0
    x.requires_grad_(True)
    loss = koleo_loss(x)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(x.grad).all()
    assert float(loss.detach()) < -math.log(1e-8)


def test_koleo_of_a_collapsed_batch_is_finite() -> None:
    x = torch.ones(32, 8, requires_grad=True)
    loss = koleo_loss(x, eps=1e-8)
    loss.backward()
    assert float(loss.detach()) == pytest.approx(-math.log(1e-8), rel=1e-4)
    assert torch.isfinite(x.grad).all()


def test_koleo_pushes_near_duplicates_apart() -> None:
    x = _rand(32, 16, seed=5)
    x[1] = x[0] + 1e-4 * _rand(16, seed=6)
    before = float(torch.linalg.vector_norm(torch.nn.functional.normalize(x[:2], dim=-1).diff(dim=0)))
    x.requires_grad_(True)
    koleo_loss(x).backward()
    step = x.detach() - 1e-6 * x.grad / x.grad.norm()  # a tiny normalised gradient step
    after = float(torch.linalg.vector_norm(torch.nn.functional.normalize(step[:2], dim=-1).diff(dim=0)))
    assert torch.isfinite(x.grad).all()
    assert after > before


def test_koleo_of_a_single_row_is_zero() -> None:
    assert float(koleo_loss(torch.randn(1, 8))) == 0.0


# -- Sinkhorn-Knopp --------------------------------------------------------------------------------------------------
def _sinkhorn_reference(logits: np.ndarray, temp: float, iterations: int) -> np.ndarray:
    """SwAV / DINOv2's algorithm as published, with loops: Q = exp(logits / temp)^T (K x B), then alternately
    make every prototype's row sum 1/K and every sample's column sum 1/B; return B * Q^T."""
    B, K = logits.shape
    q = [[math.exp(logits[b][k] / temp) for b in range(B)] for k in range(K)]
    total = sum(sum(r) for r in q)
    q = [[v / total for v in r] for r in q]
    for _ in range(iterations):
        for k in range(K):
            s = sum(q[k])
            q[k] = [v / s / K for v in q[k]]
        for b in range(B):
            s = sum(q[k][b] for k in range(K))
            for k in range(K):
                q[k][b] = q[k][b] / s / B
    return np.array([[q[k][b] * B for k in range(K)] for b in range(B)])


def test_sinkhorn_knopp_matches_the_published_algorithm() -> None:
    logits = _rand(6, 4, seed=7) * 0.3
    got = sinkhorn_knopp(logits, 0.1, iterations=3)
    ref = _sinkhorn_reference(logits.double().numpy(), 0.1, 3)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-6)


def test_sinkhorn_knopp_survives_logits_that_overflow_exp() -> None:
    # A trained head at teacher temperature 0.04: logits / temp ~ 2500, where exp() overflows even in float64,
    # and one prototype scoring far below the rest for every sample (its row underflows to 0 in the usual form)
    small = _rand(32, 8, seed=8) * 0.3
    big = small + 100.0
    big[:, -1] -= 60.0
    got = sinkhorn_knopp(big, 0.04)
    assert torch.isfinite(got).all()
    np.testing.assert_allclose(got.sum(1).numpy(), 1.0, rtol=1e-5)
    # Sinkhorn-Knopp's first step divides out any per-prototype factor exp(c_k / temp), so these targets must be
    # those of the published algorithm on the small logits, which it can compute
    # (tolerance: float32 holds logits / temp ~ 2500 to ~2e-4, hence relative errors of that size)
    ref = _sinkhorn_reference(small.double().numpy(), 0.04, 3)
    np.testing.assert_allclose(got.numpy(), ref, rtol=2e-3, atol=1e-7)
    assert float(got[:, -1].sum()) == pytest.approx(32 / 8, rel=0.5)  # the low prototype still gets its share


def test_sinkhorn_knopp_of_no_rows_is_empty() -> None:
    # a step (or a rank) where no view drew an iBOT mask
    assert sinkhorn_knopp(torch.zeros(0, 6), 0.07).shape == (0, 6)


def test_sinkhorn_knopp_extra_rows_join_the_balancing_only() -> None:
    logits, queue = _rand(4, 6, seed=9), _rand(10, 6, seed=10)
    got = sinkhorn_knopp(logits, 0.1, extra_logits=queue)
    joint = sinkhorn_knopp(torch.cat([logits, queue]), 0.1)
    assert got.shape == (4, 6)
    torch.testing.assert_close(got, joint[:4])


def test_logit_queue_fills_then_wraps() -> None:
    q = LogitQueue(5, 2)
    q.push(torch.arange(6.0).reshape(3, 2))
    assert q.contents() is None  # not full yet: Sinkhorn-Knopp balances over the batch alone
    q.push(torch.arange(6.0, 12.0).reshape(3, 2))
    rows = q.contents()
    assert rows is not None
    assert sorted(rows[:, 0].tolist()) == [2.0, 4.0, 6.0, 8.0, 10.0]  # the 5 most recent of 6 pushed rows
    assert int(q.pointer) == 1


# -- softmax centring, schedules ---------------------------------------------------------------------------------------
def test_softmax_centering_uses_the_previous_centre_then_updates_it() -> None:
    c = SoftmaxCentering(3, momentum=0.9)
    a = torch.tensor([[1.0, 2.0, 3.0], [3.0, 0.0, 0.0]])
    p1 = c(a, 0.5)
    torch.testing.assert_close(p1, torch.softmax(a / 0.5, -1))  # centre starts at 0
    np.testing.assert_allclose(c.center.numpy(), [[0.2, 0.1, 0.15]], rtol=1e-6)  # 0.1 * batch mean
    b = torch.tensor([[0.0, 0.0, 1.0]])
    p2 = c(b, 0.5)
    torch.testing.assert_close(p2, torch.softmax((b - torch.tensor([[0.2, 0.1, 0.15]])) / 0.5, -1))
    np.testing.assert_allclose(c.center.numpy(), [[0.18, 0.09, 0.235]], rtol=1e-6)


def test_softmax_centering_ignores_an_empty_batch() -> None:
    c = SoftmaxCentering(3)
    c.update(torch.zeros(0, 3))
    assert torch.equal(c.center, torch.zeros(1, 3))


def test_teacher_temperature_and_momentum_schedules() -> None:
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_temperature(3, 0, 0.04, 0.07) == pytest.approx(0.07)
    assert teacher_momentum(0, 101, 0.992) == pytest.approx(0.992)
    assert teacher_momentum(50, 101, 0.992) == pytest.approx(0.996)
    assert teacher_momentum(100, 101, 0.992) == pytest.approx(1.0)


# -- masks, head -----------------------------------------------------------------------------------------------------
def test_block_mask_meets_its_budget_with_rectangles() -> None:
    for seed in range(20):
        m = block_mask((14, 14), 60, random.Random(seed))
        assert 40 <= int(m.sum()) <= 60  # never over budget; at most a few short after 10 misses
    assert int(block_mask((4, 4), 100, random.Random(0)).sum()) == 16  # capped by the grid


def test_sample_masks_mask_one_of_two_views_and_repeat_per_seed() -> None:
    counts = []
    for seed in range(50):
        m = sample_masks((8, 8), 2, mask_rng(seed), probability=0.5, ratio_range=(0.1, 0.5))
        assert m.shape == (2, 64)
        assert int(m.any(dim=1).sum()) == 1  # exactly one masked view per image at probability 0.5
        counts.append(int(m.sum()))
        assert torch.equal(m, sample_masks((8, 8), 2, mask_rng(seed)))
    assert 6 <= min(counts) and max(counts) <= 32  # 10-50% of 64 patches


def test_dino_head_shapes_and_upstream_init() -> None:
    """Shapes, and the init of DINOv2's head: trunc-normal (std 0.02) MLP with zero biases, and the prototype layer
    left at nn.Linear's default (uniform in +-1/sqrt(in)), whose rows have norm ~sqrt(1/3) = 0.58 (the freeze of
    the prototypes is a zero lr for their parameter group now, see test_train_defaults)."""
    torch.manual_seed(0)
    head = DINOHead(12, 4096, hidden_dim=512, bottleneck_dim=256, num_layers=3)
    x = torch.randn(5, 12)
    out = head(x)
    assert out.shape == (5, 4096)
    assert float(out.detach().abs().max()) <= 1.0 + 1e-5  # unit bottleneck against unit-norm prototypes (g = 1)
    rows = head.last_layer.weight_v.detach().norm(dim=1)
    assert float(rows.mean()) == pytest.approx(0.577, abs=0.01)  # trunc_normal(0.02) gave 0.32
    assert float(head.last_layer.weight_v.detach().abs().max()) <= 1 / 16
    assert torch.all(head.last_layer.weight_g == 1)
    for m in head.mlp:
        if isinstance(m, torch.nn.Linear):
            assert float(m.weight.detach().std()) == pytest.approx(0.02, rel=0.1) and not m.bias.any()


def _centred_entropy(logits: torch.Tensor, temperature: float = 0.04) -> float:
    """Mean entropy of the softmax of ``logits`` centred over the batch (softmax centring with an exact centre)."""
    p = torch.softmax((logits - logits.mean(0)) / temperature, dim=1)
    return float(-(p * p.clamp_min(1e-12).log()).sum(1).mean())


def test_head_batch_norm_gives_sharp_targets_for_alike_embeddings() -> None:
    """Embeddings sharing a large common part (a random ViT's on small digits have pairwise cosine ~0.98): without
    batch normalisation the centred teacher targets are uniform to within 0.5% of ln K, with it their entropy is
    ~0.86 ln K, as at the first step of a ViT on real digits."""
    torch.manual_seed(0)
    x = torch.randn(1, 192) * 3 + 0.3 * torch.randn(256, 192)
    pairwise = F.normalize(x, dim=1) @ F.normalize(x, dim=1).T
    assert 0.98 < float(pairwise.mean()) < 0.99
    log_k = math.log(1024)
    torch.manual_seed(1)
    plain = DINOHead(192, 1024, hidden_dim=512)
    torch.manual_seed(1)
    normed = DINOHead(192, 1024, hidden_dim=512, batch_norm=True)
    with torch.no_grad():
        assert _centred_entropy(plain(x)) > 0.995 * log_k
        assert _centred_entropy(normed(x)) < 0.9 * log_k


def test_head_batch_norm_uses_the_rows_it_is_given_in_both_modes() -> None:
    """The teacher (eval mode) standardises with its own batch as the student does; no running statistics are
    kept (nothing for the EMA or a checkpoint to carry); one row maps to the bias, no rows to no rows."""
    torch.manual_seed(0)
    head = DINOHead(12, 64, hidden_dim=32, bottleneck_dim=16, batch_norm=True)
    assert not list(head.buffers())
    bn = next(m for m in head.mlp if isinstance(m, BatchStandardise))
    x = torch.randn(8, 12)
    train_out = head(x)
    head.eval()
    assert torch.equal(head(x), train_out)
    h = torch.randn(8, 32) * 5 + 3
    z = bn(h)
    assert torch.allclose(z.mean(0), torch.zeros(32), atol=1e-5)
    assert torch.allclose(z.std(0, unbiased=False), torch.ones(32), atol=1e-3)
    with torch.no_grad():
        bn.bias.fill_(0.25)
    assert torch.equal(bn(h[:1]), torch.full((1, 32), 0.25))
    assert bn(h[:0]).shape == (0, 32)
    assert head(x[:1]).shape == (1, 64)


def test_crops_only_views_leave_the_pixels_alone() -> None:
    """``photometric=False``: a full-image global crop is the image resized, the same for both global views; with
    DINOv2's augmentations the second view differs (blur, colour, solarisation)."""
    from PIL import Image

    from ornis.data.augment import seeded
    from ornis.train.dino_v2.multicrop import MultiCropConfig, MultiCropTransform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    full = {"global_size": 32, "local_size": 16, "local_crops": 2, "global_scale": (1.0, 1.0)}
    with seeded(3):
        plain = MultiCropTransform(MultiCropConfig(**full, photometric=False))(image)
    a, b = plain["global_crops"]
    assert torch.equal(a, b) and a.shape == (3, 32, 32)
    assert [t.shape for t in plain["local_crops"]] == [(3, 16, 16)] * 2
    with seeded(3):
        a, b = MultiCropTransform(MultiCropConfig(**full))(image)["global_crops"]
    assert not torch.equal(a, b)


@pytest.mark.parametrize("scale", [(0.0, 1.0), (0.6, 0.4), (0.5, 1.5)])
def test_crop_scales_out_of_range_are_refused(scale: tuple[float, float]) -> None:
    from ornis.train.dino_v2.multicrop import MultiCropConfig

    with pytest.raises(ValueError, match="local_scale must be two areas"):
        MultiCropConfig(local_scale=scale)
