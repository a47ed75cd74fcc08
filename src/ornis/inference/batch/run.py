"""The entry points: ``embed`` / ``classify`` a collection in this process or as one rank of a ``torchrun`` group."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from ornis.errors import OrnisError
from ornis.inference.batch.job import BatchJob, BatchSummary, WorkerStats, check_device_available, make_job
from ornis.inference.batch.output import PreparedOutput, finalize_output, prepare_output
from ornis.inference.batch.sampler import check_claims_possible
from ornis.inference.batch.worker import run_worker
from ornis.utils.distributed import (
    all_reduce_max,
    all_reduce_sum,
    all_true,
    barrier,
    close_distributed,
    init_distributed,
)

log = logging.getLogger("ornis.inference.batch")

Inputs = str | os.PathLike | Sequence[str | os.PathLike]


def embed(inputs: Inputs, *, model: str | os.PathLike, out: str | os.PathLike, **options: Any) -> BatchSummary:
    """Embed every image of ``inputs`` (folders, globs, file lists, ``.tar`` shards) with ``model`` (a published
    name or a checkpoint path) into Parquet parts under ``out``. ``options`` are the other ``BatchJob`` fields."""
    return run_batch(make_job(inputs, model=model, out=out, task="embed", **options))


def classify(
    inputs: Inputs, *, model: str | os.PathLike, out: str | os.PathLike, top_k: int = 5, **options: Any
) -> BatchSummary:
    """Like ``embed``, writing the top ``top_k`` labels and probabilities of each image instead."""
    return run_batch(make_job(inputs, model=model, out=out, task="classify", top_k=top_k, **options))


def run_batch(job: BatchJob) -> BatchSummary:
    """Run ``job`` in this process, or as one rank of a ``torchrun`` group (detected from the environment)."""
    started = time.perf_counter()
    check_device_available(job.device)  # before the folder is touched: a run that cannot start writes nothing
    # gloo even on GPUs: the group only carries barriers and a few numbers
    dist = init_distributed("gloo")
    prepared: PreparedOutput | None = None
    try:
        check_claims_possible(job.out, dist.world_size)  # every rank refuses alike, before anything is written
        failure: Exception | None = None
        if dist.is_main:
            try:
                prepared = prepare_output(job)
            except Exception as e:  # noqa: BLE001 - the other ranks must not wait for a plan that will never come
                failure = e
        if not all_true(failure is None):
            if failure is not None:
                raise failure
            raise OrnisError(f"rank 0 could not prepare {job.out}; see its error")
        # The other ranks read the checkpoint rank 0 resolved from the manifest it wrote
        stats = run_worker(job, dist=dist, model=prepared.model if prepared else None)
        totals = _total_over_ranks(stats)
        barrier()
        skipped, problems = (prepared.skipped, prepared.problems) if prepared else (0, 0)
        summary = finalize_output(job, totals, skipped=skipped, started=started, dist=dist, problems=problems)
        if dist.is_main:
            log.info("%s", summary)
        return summary
    finally:
        if prepared is not None:
            prepared.release()
        close_distributed(dist)


def _total_over_ranks(stats: WorkerStats) -> WorkerStats:
    """Counts and CPU times summed over the ranks, wall times the longest (``stats`` itself outside a group)."""
    summed = all_reduce_sum(torch.tensor(stats.values(WorkerStats.SUMMED), dtype=torch.float64))
    longest = all_reduce_max(torch.tensor(stats.values(WorkerStats.LONGEST), dtype=torch.float64))
    return WorkerStats.from_values(summed.tolist(), longest.tolist())
