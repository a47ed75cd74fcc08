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
from support.training import TINY_VIT, make_shapes

pytestmark = pytest.mark.slow  # three processes start per test: 20-40 s on 2 busy CPU cores

TORCHRUN = Path(sys.executable).parent / "torchrun"


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("dist") / "train", per_class=8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_one_and_two(args: list[str], out: Path) -> tuple[list[dict], list[dict]]:
    """Run ``ornis <args>`` as one process and under torchrun with two ranks (at the same time: most of each run
    is start-up); returns both runs' log.jsonl entries."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ORNIS_OFFLINE": "1"}
    one = [sys.executable, "-m", "ornis"]
    launch = ["--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
    two = [str(TORCHRUN), *launch, "-m", "ornis"]
    procs = [
        subprocess.Popen(
            cmd + args + ["-o", str(out / name)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for cmd, name in ((one, "one"), (two, "two"))
    ]
    for p in procs:
        output, _ = p.communicate(timeout=300)
        assert p.returncode == 0, output[-3000:]
    return tuple(
        [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()] for name in ("one", "two")
    )


def _compare(one: list[dict], two: list[dict]) -> None:
    assert [e["step"] for e in one] == [e["step"] for e in two] == [1, 2, 3]
    for a, b in zip(one, two):
        for key in ("loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= 1e-5 * abs(a[key]), (key, a, b)


VIT = ["--arch", "vit_t16", "--model-config", json.dumps(TINY_VIT), "--size", "32"]
TINY_HIERA = {"depths": [1, 1, 1, 1], "embed_dim": 16, "num_heads": 1, "drop_path_rate": 0.0}
HIERA = ["--arch", "hiera_abswin_tiny", "--size", "64", "--model-config", json.dumps(TINY_HIERA)]
COMMON = ["--steps", "3", "--batch-size", "8", "--workers", "0", "--log-every", "1", "--device", "cpu", "--lr", "3e-3"]


def test_classify_two_ranks_equal_one(tmp_path, data):
    args = ["train", "classify", str(data), *VIT, "--aug", "randaugment", *COMMON]
    one, two = _train_one_and_two(args, tmp_path)
    _compare(one, two)
    assert one[1]["loss"] != one[0]["loss"]  # each step depends on its data (the new head is random, not zero)
    # only rank 0 writes: one log line per step, one model file
    assert sorted(p.name for p in (tmp_path / "two").glob("*.pt")) == [
        "vit_t16_classify.pt",
        "vit_t16_classify_s3.pt",
        "vit_t16_classify_s3_states.pt",
    ]


@pytest.mark.parametrize("arch", ["vit", "hiera"])
def test_mim_two_ranks_equal_one(tmp_path, data, arch):
    decoder = "--mask-ratio 0.5 --decoder-dim 32 --decoder-depth 1 --decoder-heads 2".split()
    args = ["train", "mim", str(data), *(VIT if arch == "vit" else HIERA), *decoder, *COMMON]
    _compare(*_train_one_and_two(args, tmp_path))
    import ornis

    name = "vit_t16" if arch == "vit" else "hiera_abswin_tiny"
    net, _ = ornis.load_pretrained_model(tmp_path / "two" / f"{name}_mim.pt")
    assert net.name == name and net.num_classes == 0


def test_dino_sinkhorn_queue_resume_under_two_ranks_is_refused_in_one_line(tmp_path, data):
    """Each rank holds its own Sinkhorn-Knopp queue and the states file keeps the first rank's only, so a 2-rank
    resume cannot be exact: it is refused with one ``ornis: error:`` line per rank, before any step."""
    dino = "--global-size 32 --local-size 16 --local-crops 1 --out-dim 16 --head-hidden-dim 32 --head-bottleneck-dim 16"
    queue = ["--centering", "sinkhorn_knopp", "--sinkhorn-queue-size", "8"]
    model = ["--arch", "vit_t16", "--model-config", json.dumps(TINY_VIT)]
    args = ["train", "dino-v2", str(data), *model, *dino.split(), *queue, "--checkpoint-every", "1", *COMMON]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ORNIS_OFFLINE": "1"}

    def torchrun(more: list[str]) -> subprocess.CompletedProcess:
        launch = ["--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={_free_port()}"]
        cmd = [str(TORCHRUN), *launch, "-m", "ornis", *args, *more]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    first = torchrun(["-o", str(tmp_path / "first")])
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    states = tmp_path / "first" / "vit_t16_dino-v2_s1_states.pt"
    assert states.is_file()
    resumed = torchrun(["-o", str(tmp_path / "resumed"), "--resume", str(states)])
    assert resumed.returncode != 0
    errors = [line for line in resumed.stderr.splitlines() if line.startswith("ornis: error:")]
    assert errors and all("Sinkhorn-Knopp queue of a 2-process run cannot be restored" in e for e in errors), (
        resumed.stderr[-3000:]
    )
    assert "OrnisError" not in resumed.stderr  # ours is caught and printed as one line (torchrun adds its summary)
    assert not (tmp_path / "resumed" / "log.jsonl").is_file() or not (tmp_path / "resumed" / "log.jsonl").read_text()
