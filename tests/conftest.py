"""Shared test fixtures: real-looking sample images and reference (Birder) checkpoints with random weights."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

os.environ.setdefault("ORNIS_OFFLINE", "1")  # no test may reach the network by accident
torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

RGB_STATS = {"mean": (0.5191, 0.5306, 0.4877), "std": (0.2316, 0.2304, 0.2588)}


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run with ``count`` intra-op threads, restoring the previous number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: many small ops, where two OpenMP threads fighting for the cores
    were measured 10-50x slower than one. Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    with torch_threads(1):
        yield


def scale_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to the reference's scale (max |b|, at least 1e-6)."""
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    assert a.shape == b.shape, f"shape {tuple(a.shape)} != {tuple(b.shape)}"
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-6))


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Real photos shipped with scikit-image (astronaut, coffee, chelsea the cat), saved as JPEG and PNG."""
    from skimage import data

    out = tmp_path_factory.mktemp("photos")
    paths = []
    for name in ("astronaut", "coffee", "chelsea"):
        img = Image.fromarray(getattr(data, name)())
        path = out / f"{name}.jpg"
        img.save(path, quality=92)
        paths.append(path)
    img = Image.fromarray(data.rocket())
    img.save(out / "rocket.png")
    paths.append(out / "rocket.png")
    return paths


def birder_checkpoint(
    name: str, path: Path, size: int, num_classes: int, seed: int = 0, std: float = 0.05
) -> torch.nn.Module:
    """Build the reference model with random weights (every tensor drawn from N(0, std), so no zero-initialised
    head or token hides a bug), and save it in the published file format. Returns the reference model."""
    from birder.model_registry import registry

    torch.manual_seed(seed)
    net = registry.net_factory(name, num_classes, 3, size=(size, size))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, std)
    net.eval()
    torch.save(
        {
            "state": net.state_dict(),
            "birder_version": "0.8.4",
            "task": "image_classification",
            "signature": {
                "inputs": [{"data_shape": [0, 3, size, size]}],
                "outputs": [{"data_shape": [0, num_classes]}],
            },
            "class_to_idx": {f"class_{i}": i for i in range(num_classes)},
            "rgb_stats": RGB_STATS,
        },
        path,
    )
    return net


@pytest.fixture(scope="session")
def random_rgb() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=(180, 260, 3), dtype=np.uint8)
