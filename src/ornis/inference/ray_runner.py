"""The batch runner on a Ray cluster (``pip install 'ornis[ray]'``).

The driver prepares the output folder (plan, manifest) exactly as rank 0 of ``torchrun`` would; then each Ray task
runs the same ``run_worker`` as a ``torchrun`` rank: it loads the model once and claims shards from the manifest
until none is left, so Ray only places processes (one GPU each when the cluster has GPUs) and ornis keeps no
scheduler of its own. Resume, ``retry_errors`` and the output are those of ``ornis.inference.batch``; the output
folder must be on storage every node sees.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from ornis.errors import OrnisError
from ornis.inference.batch import (
    BatchJob,
    BatchSummary,
    ResolvedModel,
    WorkerStats,
    finalize_output,
    pending_shards,
    prepare_output,
    run_worker,
)
from ornis.utils.distributed import DistInfo


def _run_task(job: BatchJob, model: ResolvedModel, rank: int, world_size: int) -> WorkerStats:
    return run_worker(job, dist=DistInfo(rank, world_size), model=model)


def run_with_ray(
    job: BatchJob,
    *,
    address: str | None = None,
    num_tasks: int | None = None,
    cpus_per_task: float | None = None,
    init_kwargs: dict[str, Any] | None = None,
) -> BatchSummary:
    """Run ``job`` as ``num_tasks`` Ray tasks (default: one per GPU of the cluster, else one). Starts or joins a
    local Ray instance unless Ray is already initialised or ``address`` names a cluster."""
    try:
        import ray
    except ModuleNotFoundError:
        raise OrnisError("the Ray path needs Ray: pip install 'ornis[ray]'") from None

    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, **(init_kwargs or {}))
    resources = ray.cluster_resources()
    # One GPU a task when the cluster has GPUs, unless the job was pinned to the CPU
    gpus = int(resources.get("GPU", 0)) if job.device is None or job.device.startswith("cuda") else 0
    tasks = num_tasks or max(1, gpus)
    if cpus_per_task is None:
        cpus_per_task = max(1.0, float(resources.get("CPU", 1)) // tasks)
    prepared = prepare_output(job)  # the checkpoint is resolved and hashed here, once, and handed to every task
    # Inside a task, DataLoader workers use the task's CPUs; the device is the GPU Ray assigned (CUDA_VISIBLE_DEVICES)
    workers = (
        job.num_workers
        if job.num_workers is not None
        else max(0, int(cpus_per_task) - 1 if gpus else int(cpus_per_task) // 2)
    )
    task_job = replace(job, device=job.device or (None if gpus else "cpu"), progress=False, num_workers=workers)
    remote = ray.remote(num_gpus=1 if gpus else 0, num_cpus=cpus_per_task, max_retries=0)(_run_task)
    totals = WorkerStats()
    current = prepared
    try:
        for round_ in range(3):
            if round_ > 0:
                # A task that died (a lost node) leaves its claimed shards unfinished: a new claim attempt frees them
                if not pending_shards(job.out):
                    break
                current = prepare_output(job, model=prepared.model, lease=current.lease)
            refs = [remote.remote(task_job, prepared.model, rank, tasks) for rank in range(tasks)]
            finished, failed = [], []
            for ref in refs:
                try:
                    finished.append(ray.get(ref))
                except ray.exceptions.RayError as e:
                    failed.append(e)
            for stats in finished:
                totals.add(stats)
            if not failed:
                break
            if not finished:
                raise OrnisError(f"every Ray task failed; the first: {failed[0]}")
    finally:
        current.release()
    return finalize_output(
        job, totals, skipped=prepared.skipped, started=started, dist=DistInfo(0, tasks), problems=prepared.problems
    )
