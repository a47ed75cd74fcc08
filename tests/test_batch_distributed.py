"""Many processes: ``torchrun --nproc-per-node 2`` on CPU (gloo) gives the same rows as one process, each image
exactly once (Ray: ``test_ray_actors.py``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import torch_threads
from support.images import make_job_inputs

from ornis.inference.batch import embed, read_errors

PYTHON = sys.executable
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_job_inputs(tmp_path_factory.mktemp("dist"), 40)


@pytest.fixture(scope="module")
def single(job_inputs, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, list[float], int, int]]:
    ckpt, photos = job_inputs
    out = tmp_path_factory.mktemp("single") / "out"
    with torch_threads(1):
        embed([photos], model=ckpt, out=out, shard_size=2, batch_size=2, num_workers=0, progress=False, device="cpu")
    return _rows(out)


def _rows(out: Path) -> list[tuple[str, list[float], int, int]]:
    return sorted((r["path"], r["embedding"], r["width"], r["height"]) for r in pq.read_table(out).to_pylist())


def _assert_same_rows(found, expected) -> None:
    assert [r[0] for r in found] == [r[0] for r in expected]  # same images, each once
    assert [r[2:] for r in found] == [r[2:] for r in expected]
    a, b = np.array([r[1] for r in found]), np.array([r[1] for r in expected])
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-5


def test_torchrun_two_ranks_equal_one_process(job_inputs, single, tmp_path: Path) -> None:
    ckpt, photos = job_inputs
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        PYTHON,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "ornis",
        "embed",
        str(photos),
        "-m",
        str(ckpt),
        "-o",
        str(out),
        "--shard-size",
        "2",
        "--batch-size",
        "2",
        "--workers",
        "0",
        "--device",
        "cpu",
        "--no-progress",
    ]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_same_rows(_rows(out), single)
    assert [e["path"] for e in read_errors(out)] == [str(photos / "zero.jpg")]
    claims = [p.read_text() for p in (out / "_claims").glob("*/*")]
    assert len(claims) == 21  # every shard claimed once in this attempt
    ranks = {c.split()[1] for c in claims}
    assert ranks == {"0", "1"}, "both ranks took shards"
