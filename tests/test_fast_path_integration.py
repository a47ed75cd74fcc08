"""The CPU fast path wired through the library and the batch runner: ``load_pretrained_model(precision=...)`` and
``ornis embed --precision bf16|int8`` stay within the documented accuracy of fp32 on the shipped samples."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

import ornis
from ornis.assets import DEMO_MODEL, SAMPLES_DIR
from ornis.cli.main import main
from ornis.inference.classification import infer_image


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@pytest.mark.parametrize(("precision", "floor"), [("bf16", 0.9999), ("int8", 0.995)])
def test_load_pretrained_model_fast_path_is_close_to_fp32(precision: str, floor: float) -> None:
    net, info = ornis.load_pretrained_model(DEMO_MODEL, inference=True)
    fast, _ = ornis.load_pretrained_model(DEMO_MODEL, inference=True, precision=precision)
    transform = ornis.classification_transform(ornis.get_size_from_signature(info.signature), info.rgb_stats)
    images = sorted(SAMPLES_DIR.iterdir())
    ref = np.concatenate([infer_image(net, p, transform, return_embedding=True)[1] for p in images])
    out = np.concatenate([infer_image(fast, p, transform, return_embedding=True)[1] for p in images])
    assert out.dtype == np.float32 and out.shape == ref.shape == (16, net.embedding_size)
    assert _cosines(ref, out).min() >= floor


def test_unknown_precision_is_refused_by_name() -> None:
    with pytest.raises(ValueError, match="precision"):
        ornis.load_pretrained_model(DEMO_MODEL, precision="fp8")


@pytest.mark.parametrize(("precision", "floor"), [("bf16", 0.9999), ("int8", 0.995)])
def test_embed_cli_fast_path_rows_match_fp32(tmp_path: Path, precision: str, floor: float) -> None:
    common = ["-m", DEMO_MODEL, "--device", "cpu", "--workers", "0", "--no-progress"]
    assert main(["embed", str(SAMPLES_DIR), "-o", str(tmp_path / "fp32"), *common]) == 0
    assert main(["embed", str(SAMPLES_DIR), "-o", str(tmp_path / precision), "--precision", precision, *common]) == 0
    ref = pq.read_table(tmp_path / "fp32").sort_by("path")
    out = pq.read_table(tmp_path / precision).sort_by("path")
    assert ref.column("path").to_pylist() == out.column("path").to_pylist() and ref.num_rows == 16
    a = np.stack(ref.column("embedding").to_numpy(zero_copy_only=False))
    b = np.stack(out.column("embedding").to_numpy(zero_copy_only=False))
    assert _cosines(a, b).min() >= floor
