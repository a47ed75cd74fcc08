"""The Ray side of the batch runner: the actor that loads the model once and runs the shards it is handed, and how
many actors a cluster gets, with how many CPUs and GPUs each."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from ornis.inference.batch import BatchJob, BatchWorker, ResolvedModel, WorkerStats

CPUS_PER_CPU_ACTOR = 4  # without GPUs: one actor per 4 CPUs, half of them decoding, half running the model


@dataclass(frozen=True)
class ActorPlan:
    """How the shards are spread: ``actors`` actors of ``cpus`` CPUs and ``gpus`` GPUs each (fractions share one),
    each decoding in ``num_workers`` DataLoader workers."""

    actors: int
    cpus: float
    gpus: float
    num_workers: int

    def actor_job(self, job: BatchJob) -> BatchJob:
        """``job`` as an actor runs it: on the GPU Ray assigned it (it sees that one only, as ``cuda:0``) or the
        CPU, with this plan's DataLoader workers and no progress bar (the driver draws one)."""
        device = None if self.gpus else (job.device or "cpu")
        return replace(job, device=device, num_workers=self.num_workers, progress=False)


def plan_actors(
    resources: Mapping[str, float],
    job: BatchJob,
    *,
    num_actors: int | None = None,
    cpus_per_actor: float | None = None,
) -> ActorPlan:
    """The actors for ``job`` on a cluster with ``resources`` (``ray.cluster_resources()``): by default one per GPU
    (unless the job is pinned to the CPU), else one per ``CPUS_PER_CPU_ACTOR`` CPUs; the CPUs shared out evenly."""
    on_gpu = job.device is None or job.device.startswith("cuda")
    gpus = int(resources.get("GPU", 0)) if on_gpu else 0
    cpus = float(resources.get("CPU", 1))
    actors = num_actors or (gpus or max(1, int(cpus) // CPUS_PER_CPU_ACTOR))
    # Fractions rather than a floor of one, so that every actor fits on the cluster and none waits for resources
    # that never come (holding its shard)
    if cpus_per_actor is None:
        cpus_per_actor = max(cpus, 1.0) / actors
    gpus_per_actor = min(1.0, gpus / actors) if gpus else 0.0
    whole = int(cpus_per_actor)
    if job.num_workers is not None:
        workers = job.num_workers
    else:  # on a GPU every CPU but the model loop's decodes; on the CPU the model needs half of them
        workers = max(0, whole - 1) if gpus_per_actor else whole // 2
    return ActorPlan(actors, cpus_per_actor, gpus_per_actor, workers)


class ShardActor:
    """One Ray actor: builds a ``BatchWorker`` once (the checkpoint loaded on its device) and processes the shards
    it is handed, one call each. A call writes the shard's part file whole and renames it into place, so a call that
    Ray repeats after the actor died (before or after the rename) leaves the same rows, once."""

    def __init__(self, job: BatchJob, model: ResolvedModel) -> None:
        # An error here is kept and raised by every call: Ray would report it as the actor's death with the error
        # only as text, where a call's error reaches the driver as itself (an OrnisError keeps its one line)
        self.worker: BatchWorker | None = None
        self.error: Exception | None = None
        try:
            self.worker = BatchWorker(job, model=model)
        except Exception as e:  # noqa: BLE001 - raised again by process
            self.error = e

    def process(self, shard_id: int) -> WorkerStats:
        """Write shard ``shard_id`` (nothing when its part file exists already, unless retrying errors)."""
        if self.worker is None:
            assert self.error is not None
            raise self.error
        return self.worker.run([shard_id])
