"""The batch runner on Ray: a local Ray instance, two actors that each load the model once, shards handed out by the
driver. An actor killed mid-run (its process exits, as after an out-of-memory kill) is restarted by Ray and its shard
run again; the output holds every good image exactly once, equal to one process's, and no ``_claims/`` folder.

The kill is injected through Ray's ``worker_process_setup_hook``: in the workers only, after a shard's part file is
written (or before), the process exits once, when the test leaves a request file for it."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from conftest import torch_threads
from support.images import make_job_inputs
from support.s3 import ENV as S3_ENV
from support.s3 import S3Server, running_s3_server

from ornis.cli.main import main
from ornis.errors import OrnisError
from ornis.inference.batch import BatchJob, embed, make_job, read_errors
from ornis.inference.ray_actors import plan_actors

FAULTS_ENV = "ORNIS_TEST_RAY_FAULTS"
needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="Ray is not installed (ornis[ray])")


def _install_faults() -> None:
    """Runs in every Ray worker process: wrap the shard commit so that a request file in ``$ORNIS_TEST_RAY_FAULTS``
    (``before-commit`` or ``after-commit``) makes the first process that takes it exit once it has written a shard:
    right after that commit, or before committing its second."""
    from ornis.inference.batch.writer import ShardWriter

    faults = Path(os.environ[FAULTS_ENV])
    commit = ShardWriter.commit
    commits = []

    def take(request: str) -> bool:
        if not commits:  # mid-run: this actor has written a shard already
            return False
        try:
            (faults / request).rename(faults / f"{request}.taken-by-{os.getpid()}")
        except FileNotFoundError:
            return False
        return True

    def faulty_commit(self: ShardWriter, shard: int) -> None:
        if take("before-commit"):
            os._exit(1)
        commit(self, shard)
        commits.append(shard)
        with open(faults / "commits.log", "a") as f:
            f.write(f"{os.getpid()} {shard}\n")
        if take("after-commit"):
            os._exit(1)

    ShardWriter.commit = faulty_commit  # type: ignore[method-assign]


@pytest.fixture(scope="module")
def faults(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server | None]:
    """moto's S3 server when the object-storage test extra is installed, else None (that test skips)."""
    if importlib.util.find_spec("s3fs") is None or importlib.util.find_spec("moto") is None:
        yield None
        return
    with running_s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def local_ray(faults: Path, s3: S3Server | None) -> Iterator[None]:
    ray = pytest.importorskip("ray")
    tests = str(Path(__file__).parent)  # so that the workers can import this module's hook
    env = {
        "OMP_NUM_THREADS": "1",
        "ORNIS_OFFLINE": "1",
        FAULTS_ENV: str(faults),
        "PYTHONPATH": os.pathsep.join(p for p in (tests, os.environ.get("PYTHONPATH")) if p),
    }
    if s3 is not None:  # the actors reach the same server the driver does
        env.update({k: os.environ[k] for k in (*S3_ENV, "AWS_ENDPOINT_URL")})
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        runtime_env={"env_vars": env, "worker_process_setup_hook": _install_faults},
    )
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def job_inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_job_inputs(tmp_path_factory.mktemp("ray"), 24)


def _job(job_inputs: tuple[Path, Path], out: Path | str) -> BatchJob:
    ckpt, photos = job_inputs
    return make_job(
        [photos], model=ckpt, out=out, shard_size=2, batch_size=2, num_workers=0, progress=False, device="cpu"
    )


@pytest.fixture(scope="module")
def single(job_inputs, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[str, list[float], int, int]]:
    out = tmp_path_factory.mktemp("single") / "out"
    job = _job(job_inputs, out)
    with torch_threads(1):
        embed(job.inputs, model=job.model, out=out, shard_size=2, batch_size=2, num_workers=0, progress=False)
    return _rows(out)


def _rows(out: Path) -> list[tuple[str, list[float], int, int]]:
    return sorted((r["path"], r["embedding"], r["width"], r["height"]) for r in pq.read_table(out).to_pylist())


def _assert_same_rows(found, expected) -> None:
    assert [r[0] for r in found] == [r[0] for r in expected]  # the same images, each once
    assert [r[2:] for r in found] == [r[2:] for r in expected]
    a, b = np.array([r[1] for r in found]), np.array([r[1] for r in expected])
    assert np.abs(a - b).max() / np.abs(b).max() < 1e-5


def _commits(faults: Path) -> list[tuple[int, int]]:
    log = faults / "commits.log"
    lines = log.read_text().split("\n") if log.exists() else []
    log.unlink(missing_ok=True)
    return [(int(pid), int(shard)) for pid, shard in (line.split() for line in lines if line)]


@needs_ray
@pytest.mark.slow
def test_two_actors_equal_one_process(local_ray, faults: Path, job_inputs, single, tmp_path: Path) -> None:
    from ornis.inference.ray_runner import run_with_ray

    _commits(faults)
    out = tmp_path / "out"
    summary = run_with_ray(_job(job_inputs, out), num_actors=2)
    assert (summary.done, summary.errors, summary.world_size, summary.shards_done) == (24, 1, 2, 13)
    _assert_same_rows(_rows(out), single)
    assert [e["path"] for e in read_errors(out)] == [str(job_inputs[1] / "zero.jpg")]
    assert not (out / "_claims").exists()
    commits = _commits(faults)
    assert sorted(s for _, s in commits) == list(range(13)), "each shard written once"
    assert len({pid for pid, _ in commits}) == 2, "both actors took shards"


@needs_ray
@pytest.mark.slow
@pytest.mark.parametrize("request_file", ["after-commit", "before-commit"])
def test_actor_killed_mid_run(local_ray, faults: Path, job_inputs, single, tmp_path: Path, request_file: str) -> None:
    from ornis.inference.ray_runner import run_with_ray

    _commits(faults)
    (faults / request_file).touch()
    out = tmp_path / "out"
    summary = run_with_ray(_job(job_inputs, out), num_actors=2)
    killed = list(faults.glob(f"{request_file}.taken-by-*"))
    assert len(killed) == 1, "an actor was killed"
    (killed[0]).unlink()
    killed_pid = int(killed[0].name.rsplit("-", 1)[1])
    assert (summary.done, summary.errors, summary.shards_done, summary.shards_total) == (24, 1, 13, 13)
    _assert_same_rows(_rows(out), single)
    assert not (out / "_claims").exists()
    manifest = (out / "_manifest.json").read_text()
    assert manifest.count('"status": "done"') == 13
    commits = _commits(faults)
    # Written once each: killed after its commit, the shard is found done when Ray runs it again; killed before,
    # the restarted actor (a new process) writes it. After a commit, the restarted actor writes whatever shards are
    # still left when it is back, which on a loaded machine can be some (a third process) or none
    assert sorted(s for _, s in commits) == list(range(13))
    assert [pid for pid, _ in commits].count(killed_pid) == 1, "the killed actor wrote one shard, then died"
    writers = len({pid for pid, _ in commits})
    assert writers in (2, 3) if request_file == "after-commit" else writers == 3


@needs_ray
@pytest.mark.slow
def test_output_in_object_storage(local_ray, s3: S3Server | None, faults: Path, job_inputs, single) -> None:
    """No shared filesystem: the actors PUT their parts into a bucket, the driver writes the manifest; an actor killed
    after a PUT has its shard found done when Ray runs it again."""
    from ornis.inference.ray_runner import run_with_ray

    if s3 is None:
        pytest.skip("needs s3fs and moto[server] (the test extra)")
    _commits(faults)
    (faults / "after-commit").touch()
    bucket = s3.make_bucket("ray")
    summary = run_with_ray(_job(job_inputs, f"{bucket}/emb"), num_actors=2)
    killed = list(faults.glob("after-commit.taken-by-*"))
    assert len(killed) == 1, "an actor was killed"
    killed[0].unlink()
    assert (summary.done, summary.errors, summary.shards_done) == (24, 1, 13)
    table = ds.dataset("ray/emb", format="parquet", filesystem=s3.arrow_filesystem()).to_table()
    _assert_same_rows(sorted((r["path"], r["embedding"], r["width"], r["height"]) for r in table.to_pylist()), single)
    keys = s3.keys(f"{bucket}/emb")
    assert not [k for k in keys if k.startswith("_claims") or ".tmp" in k]
    assert s3.filesystem().cat("ray/emb/_manifest.json").decode().count('"status": "done"') == 13
    assert sorted(s for _, s in _commits(faults)) == list(range(13))  # each part PUT once


@needs_ray
@pytest.mark.slow
def test_cli_resumes_a_one_process_run(local_ray, job_inputs, single, tmp_path: Path) -> None:
    out = tmp_path / "out"
    job = _job(job_inputs, out)
    with torch_threads(1):
        embed(job.inputs, model=job.model, out=out, shard_size=2, batch_size=2, num_workers=0, progress=False)
    for part in sorted(out.glob("part-*.parquet"))[::2]:
        part.unlink()  # 7 of the 13 shards to do again
    argv = ["embed", *job.inputs, "-m", job.model, "-o", str(out), "--shard-size", "2", "--batch-size", "2"]
    argv += ["--workers", "0", "--device", "cpu", "--no-progress", "--ray", "--ray-workers", "2"]
    assert main(argv) == 0
    _assert_same_rows(_rows(out), single)
    assert not (out / "_claims").exists()
    assert (out / "_manifest.json").read_text().count('"status": "done"') == 13


@needs_ray
@pytest.mark.slow
def test_actor_error_is_one_line(local_ray, job_inputs, tmp_path: Path) -> None:
    from ornis.inference.ray_runner import run_with_ray

    job = replace(_job(job_inputs, tmp_path / "out"), device="cuda")  # the local cluster has no GPU
    with pytest.raises(OrnisError, match="no CUDA GPU") as caught:
        run_with_ray(job, num_actors=1)
    assert "\n" not in str(caught.value)


def test_plan_actors_defaults() -> None:
    job = make_job(["x"], model="m", out="o")
    gpu = plan_actors({"CPU": 32, "GPU": 4}, job)
    assert (gpu.actors, gpu.cpus, gpu.gpus, gpu.num_workers) == (4, 8.0, 1.0, 7)
    assert gpu.actor_job(job).device is None
    cpu = plan_actors({"CPU": 16}, job)
    assert (cpu.actors, cpu.cpus, cpu.gpus, cpu.num_workers) == (4, 4.0, 0.0, 2)
    assert cpu.actor_job(job).device == "cpu"
    pinned = plan_actors({"CPU": 2, "GPU": 2}, make_job(["x"], model="m", out="o", device="cpu", num_workers=0))
    assert (pinned.actors, pinned.cpus, pinned.gpus, pinned.num_workers) == (1, 2.0, 0.0, 0)
    shared = plan_actors({"CPU": 2, "GPU": 1}, job, num_actors=4)
    assert (shared.cpus, shared.gpus) == (0.5, 0.25)  # every actor fits, none waits for a whole GPU
