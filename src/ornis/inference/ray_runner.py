"""The batch runner on a Ray cluster (``pip install 'ornis[ray]'``): Ray schedules, ornis claims nothing.

The driver prepares the output folder (plan, manifest, the checkpoint resolved and hashed once) as rank 0 of
``torchrun`` would, but starts no claim attempt: no ``_claims/`` folder, no file locks between workers. It then starts
one actor per GPU (or per few CPUs, ``ray_actors.plan_actors``) that loads the model once, and hands each idle actor
the next pending shard. An actor that dies (a lost node, an out-of-memory kill) is restarted by Ray, which runs its
shard again (``max_task_retries``); a part file is written whole and renamed, so a shard run twice is still there
once. The driver gets every shard's result back and records the finished ones in the manifest, then reconciles and
merges the errors as every run does. The output folder is one every node reaches: a shared filesystem, or object
storage (an ``s3://`` / ``gs://`` URL), where the actors write only their own part and errors objects and the driver
is the manifest's only writer, so nothing needs a lock.

Why one's own loop over actors rather than Ray Data's ``map_batches``: the unit of work is a shard that an actor
writes to the output itself (Parquet part, errors, features, with the checkpoint's metadata), not a stream of rows
to hand back; ``ray.wait`` over one call per idle actor gives the same pull scheduling as ``ray.util.ActorPool``
while telling which shard each result or failure belongs to.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

import pyarrow.parquet as pq

from ornis.errors import OrnisError
from ornis.inference.batch import BatchJob, BatchProgress, BatchSummary, WorkerStats, finalize_output, prepare_output
from ornis.inference.batch.layout import errors_path, part_name
from ornis.inference.batch.manifest import Manifest, load_manifest, updating_manifest
from ornis.inference.batch.output import FOOTER_BLOCK
from ornis.inference.ray_actors import ShardActor, plan_actors
from ornis.utils.distributed import DistInfo
from ornis.utils.progress import progress_enabled
from ornis.utils.storage import Location, location, open_input, read_jsonl

log = logging.getLogger("ornis.inference.batch")

SHARD_RETRIES = 3  # a shard whose actor dies more often (an image that crashes the process every time) fails the run
RECORD_EVERY_S = 5.0  # the driver's manifest updates, batched: a rewrite per shard would cost O(shards^2) bytes


def run_with_ray(
    job: BatchJob,
    *,
    address: str | None = None,
    num_actors: int | None = None,
    cpus_per_actor: float | None = None,
    init_kwargs: dict[str, Any] | None = None,
) -> BatchSummary:
    """Run ``job`` on ``num_actors`` Ray actors (default: one per GPU of the cluster, else one per 4 CPUs), each
    loading the model once. Starts or joins a local Ray instance unless Ray is already initialised or ``address``
    names a cluster. Resume, ``retry_errors`` and the output are those of ``ornis.inference.batch``."""
    ray = _import_ray()
    started = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=address, **(init_kwargs or {}))
    plan = plan_actors(ray.cluster_resources(), job, num_actors=num_actors, cpus_per_actor=cpus_per_actor)
    prepared = prepare_output(job, claims=False)  # the checkpoint is resolved and hashed here, once
    out = location(job.out)
    before = load_manifest(out)
    todo = [s.id for s in before.shards if s.status != "done" or (job.retry_errors and s.errors)]
    actor_class = ray.remote(ShardActor).options(
        num_cpus=plan.cpus, num_gpus=plan.gpus, max_restarts=-1, max_task_retries=SHARD_RETRIES
    )
    actors = [actor_class.remote(plan.actor_job(job), prepared.model) for _ in range(min(plan.actors, len(todo)))]
    recorder = _Recorder(out)
    total = sum(before.shards[i].count for i in todo) if not job.retry_errors else 0
    totals = WorkerStats()
    try:
        with BatchProgress(total, enabled=progress_enabled(job.progress), desc=job.task) as progress:

            def done(shard: int, stats: WorkerStats) -> None:
                totals.add(stats)
                recorder.add(shard)
                progress.update(stats.images + stats.errors)

            failures = _dispatch(ray, actors, todo, done)
    finally:
        recorder.flush()
        prepared.release()
        for actor in actors:
            ray.kill(actor)
    dist = DistInfo(0, plan.actors)
    summary = finalize_output(
        job, totals, skipped=prepared.skipped, started=started, dist=dist, problems=prepared.problems
    )
    if failures:
        raise _failure(job, failures)
    summary = _counted(summary, load_manifest(out), todo, prepared.skipped, prepared.problems)
    log.info("%s", summary)
    return summary


def _import_ray() -> Any:
    try:
        import ray
    except ModuleNotFoundError:
        raise OrnisError("the Ray path needs Ray: pip install 'ornis[ray]'") from None
    return ray


def _dispatch(
    ray: Any, actors: list[Any], shards: Iterable[int], done: Callable[[int, WorkerStats], None]
) -> list[tuple[int, Exception]]:
    """Hand each idle actor the next shard until all are done; ``done(shard, stats)`` for each one that finished.
    After the first failure no new shard is handed out and the running ones finish. Returns the failures."""
    queue = deque(shards)
    idle = list(actors)
    running: dict[Any, tuple[Any, int]] = {}
    failures: list[tuple[int, Exception]] = []
    while running or (queue and idle and not failures):
        while queue and idle and not failures:
            actor, shard = idle.pop(), queue.popleft()
            running[actor.process.remote(shard)] = (actor, shard)
        [ref], _ = ray.wait(list(running), num_returns=1)
        actor, shard = running.pop(ref)
        idle.append(actor)
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayError as e:
            failures.append((shard, e))
            continue
        done(shard, stats)
    return failures


class _Recorder:
    """The driver's record of finished shards in the manifest, written at most every ``RECORD_EVERY_S`` seconds
    and at the end: the one place a Ray run updates the manifest while it runs."""

    def __init__(self, out: Location) -> None:
        self.out = out
        self.pending: list[int] = []
        self.last = time.monotonic()

    def add(self, shard: int) -> None:
        """Shard ``shard`` came back done."""
        self.pending.append(shard)
        if time.monotonic() - self.last >= RECORD_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Mark the shards reported since the last flush done, with their rows and errors from their files."""
        if self.pending:
            record_finished(self.out, self.pending)
        self.pending, self.last = [], time.monotonic()


def record_finished(out: Location, shard_ids: Iterable[int]) -> None:
    """Mark ``shard_ids`` done in ``out``'s manifest (a folder or object storage), with the rows of their part files
    and the lines of their errors files. In object storage the driver is the manifest's only writer."""
    with updating_manifest(out) as manifest:
        for i in shard_ids:
            with open_input(out / part_name(i), FOOTER_BLOCK) as f:
                rows = pq.ParquetFile(f).metadata.num_rows
            manifest.shards[i].mark_done(rows, len(read_jsonl(errors_path(out, i))))


def _counted(summary: BatchSummary, after: Manifest, todo: list[int], skipped: int, problems: int) -> BatchSummary:
    # From the part files rather than the actors' reports: a shard an actor wrote just before it died is reported by
    # its second run as already there
    errors = sum(after.shards[i].errors or 0 for i in todo)
    return replace(summary, done=after.done_rows - skipped, errors=errors + problems)


def _failure(job: BatchJob, failures: list[tuple[int, Exception]]) -> Exception:
    shard, error = failures[0]
    cause = getattr(error, "cause", None)
    if isinstance(cause, OrnisError):  # a user mistake (a checkpoint that does not load...): its own one line
        return cause
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return OrnisError(
        f"{job.out}: {len(failures)} shard(s) failed on Ray, the first (shard {shard}): {first}; the other shards "
        "are written: run the same command again to finish"
    )
