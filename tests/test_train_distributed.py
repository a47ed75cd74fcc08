"""``torchrun --nproc-per-node 2`` on CPU (gloo DDP): each recipe runs, and the same global batch gives the same
losses and gradient norms as one process (each rank takes its own slice of every global batch, augmentations and
MIM masks are drawn per sample, so the two runs see the very same numbers up to float summation order).

Tolerance: 1e-5 relative (fp32; DDP averages the two half-batch gradients where one process sums one batch).
FSDP (``--fsdp``) needs CUDA and cannot be exercised here.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from test_train_loop import TINY_VIT, make_shapes

pytestmark = pytest.mark.slow  # two process launches per test: ~20 s on 2 CPU cores

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("dist") / "train", per_class=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train(args: list[str], out: Path, ranks: int) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ORNIS_OFFLINE": "1"}
    if ranks == 1:
        cmd = [sys.executable, "-m", "ornis"]
    else:
        cmd = [str(TORCHRUN), f"--nproc-per-node={ranks}", "--master-addr=127.0.0.1", f"--master-port={_free_port()}",
               "-m", "ornis"]
    done = subprocess.run(cmd + args + ["-o", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _compare(one: list[dict], two: list[dict]) -> None:
    assert [e["step"] for e in one] == [e["step"] for e in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)


COMMON = ["--model-config", json.dumps(TINY_VIT), "--size", "32", "--steps", "3", "--batch-size", "8", "--workers", "0",
          "--log-every", "1", "--device", "cpu", "--lr", "3e-3"]


def test_classify_two_ranks_equal_one(tmp_path, data):
    args = ["train", "classify", str(data), "--arch", "vit_t16", "--aug", "randaugment", *COMMON]
    one = _train(args, tmp_path / "one", 1)
    two = _train(args, tmp_path / "two", 2)
    _compare(one, two)
    assert one[1]["loss"] != one[0]["loss"]  # steps 2.. depend on the data (step 1 is ln 3: a zero head)
    # only rank 0 writes: one log line per step, one model file
    assert sorted(p.name for p in (tmp_path / "two").glob("*.pt")) == ["vit_t16_classify.pt", "vit_t16_classify_s3.pt",
                                                                       "vit_t16_classify_s3_states.pt"]


def test_mim_two_ranks_equal_one(tmp_path, data):
    args = ["train", "mim", str(data), "--arch", "vit_t16", "--mask-ratio", "0.5", "--decoder-dim", "32",
            "--decoder-depth", "1", "--decoder-heads", "2", *COMMON]
    _compare(_train(args, tmp_path / "one", 1), _train(args, tmp_path / "two", 2))
    import ornis

    net, _ = ornis.load_pretrained_model(tmp_path / "two" / "vit_t16_mim.pt")
    assert net.name == "vit_t16" and net.num_classes == 0
