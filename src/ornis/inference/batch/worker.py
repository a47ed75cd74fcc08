"""The worker every ``torchrun`` rank and Ray task runs: load the model once, claim shards until none is left,
decode them in DataLoader workers, run the model, write the parts."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from pathlib import Path
from types import TracebackType

import torch
from torch.utils.data import DataLoader

from ornis.data.datasets import ShardDataset
from ornis.inference.batch.job import BatchJob, WorkerStats, check_device_available
from ornis.inference.batch.layout import CLAIMS_DIR, PLAN
from ornis.inference.batch.lease import AttemptLease
from ornis.inference.batch.manifest import load_manifest
from ornis.inference.batch.model import ResolvedModel, load_model
from ornis.inference.batch.records import Batch, Outputs, collate_batch
from ornis.inference.batch.runner import ModelRunner
from ornis.inference.batch.sampler import ClaimingBatchSampler, check_claims_possible
from ornis.inference.batch.writer import ShardWriter
from ornis.utils.distributed import DistInfo, default_device, default_num_workers
from ornis.utils.progress import progress_bar, progress_enabled
from ornis.utils.storage import Location, location

_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar:20}| {n_fmt}/{total_fmt} images {rate_fmt}  ETA {remaining}"


def run_worker(
    job: BatchJob,
    *,
    dist: DistInfo | None = None,
    model: ResolvedModel | None = None,
    shard_ids: Sequence[int] | None = None,
) -> WorkerStats:
    """Claim shards of a prepared output folder and process them until none is left. With ``shard_ids``, process
    exactly those shards (no claiming): the idempotent shard function. ``model`` is the checkpoint
    ``prepare_output`` resolved (default: the one the folder's manifest records). Returns this worker's counts and
    timings."""
    return BatchWorker(job, dist=dist, model=model).run(shard_ids)


class BatchWorker:
    """A worker that holds its model: built once (the checkpoint loaded on its device), then ``run`` as often as
    there is work, e.g. once per shard a Ray actor is handed."""

    def __init__(self, job: BatchJob, *, dist: DistInfo | None = None, model: ResolvedModel | None = None) -> None:
        started = time.perf_counter()
        self.job = job
        self.dist = dist or DistInfo()
        self.out = location(job.out)
        self.model = model or ResolvedModel.from_manifest(load_manifest(self.out), job)
        check_device_available(job.device)
        device = _device(job, self.dist)
        net, info = load_model(self.model, job, device)
        self.runner = ModelRunner(net, info, job, device)
        self.load_s = time.perf_counter() - started

    def run(self, shard_ids: Sequence[int] | None = None) -> WorkerStats:
        """Claim shards until none is left, or process exactly ``shard_ids`` (no claiming). Returns the counts and
        timings of this call (the first call's wall time includes loading the model)."""
        started = time.perf_counter()
        job, dist, out = self.job, self.dist, self.out
        check_claims_possible(out, dist.world_size, shard_ids)
        manifest = load_manifest(out)
        batch_size = job.batch_size or (256 if self.runner.device.type == "cuda" else 32)
        sampler = ClaimingBatchSampler(
            out, manifest, batch_size, retry_errors=job.retry_errors, shard_ids=shard_ids, rank=dist.rank
        )
        loader = _loader(out, job, self.runner, sampler, dist)
        writer = ShardWriter(out, job, self.runner, sampler.expected, self.model.sha256)
        pending = manifest.pending_count if not job.retry_errors else 0
        enabled = dist.is_main and progress_enabled(job.progress)
        # The lease tells a run that starts meanwhile to share this attempt's claims rather than reset them
        leased = isinstance(out, Path) and manifest.attempt  # object storage has no leases
        with (
            AttemptLease(out / CLAIMS_DIR / manifest.attempt) if leased else nullcontext(),
            BatchProgress(pending, dist.world_size, enabled=enabled, desc=job.task) as progress,
        ):
            stats = _pipeline(loader, self.runner, writer, progress)
        stats.wall_s = time.perf_counter() - started + self.load_s
        self.load_s = 0.0
        return stats


def _device(job: BatchJob, dist: DistInfo) -> torch.device:
    if job.device is None and torch.cuda.is_available():
        # More ranks than GPUs on a node share them round-robin
        device = torch.device("cuda", dist.local_rank % torch.cuda.device_count())
    else:
        device = default_device(job.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _loader(
    out: Location, job: BatchJob, runner: ModelRunner, sampler: ClaimingBatchSampler, dist: DistInfo
) -> DataLoader:
    dataset = ShardDataset(out / PLAN, runner.cpu_transform, job.decode, raw_jpeg=job.decode_on_device)
    # torchrun says how many ranks share this machine's CPUs; Ray tasks get their CPUs through num_workers
    workers = default_num_workers(runner.device) if job.num_workers is None else job.num_workers
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_batch,
        pin_memory=runner.device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_init,
    )


def _pipeline(
    batches: Iterable[Batch], runner: ModelRunner, writer: ShardWriter, progress: BatchProgress
) -> WorkerStats:
    """The model loop: while the device runs one batch, the rows of the one before are read back and written."""
    stats = WorkerStats()
    it = iter(batches)
    previous: tuple[Batch, Callable[[], Outputs]] | None = None
    first_batch_at = None
    while True:
        t0 = time.perf_counter()
        batch = next(it, None)
        stats.wait_s += time.perf_counter() - t0
        if batch is not None and first_batch_at is None:
            first_batch_at = time.perf_counter()
        t1 = time.perf_counter()
        current = None
        if batch is not None:
            pixels, batch = runner.decode_jpegs(batch) if batch.jpeg else (batch.pixels, batch)
            current = (batch, runner.launch(pixels) if pixels is not None else Outputs)
        finished = (previous[0], previous[1]()) if previous is not None else None
        stats.model_s += time.perf_counter() - t1
        if finished is not None:
            done, outputs = finished
            stats.decode_s += done.decode_s
            stats.images += len(done.samples)
            stats.errors += len(done.failed)
            stats.shards += writer.add(done, outputs)
            progress.update(done.count)
        if current is None:
            break
        previous = current
    stats.loop_s = time.perf_counter() - first_batch_at if first_batch_at else 0.0
    return stats


def _worker_init(worker_id: int) -> None:
    # Decoding is one image per worker at a time; torch's own threads would only compete with the other workers
    torch.set_num_threads(1)


class BatchProgress:
    """A progress bar on stderr (tqdm): images done of ``total``, images/s and ETA. Under torchrun rank 0 draws it
    and counts its own images times the number of ranks. Nothing shows for a run shorter than half a second."""

    def __init__(self, total: int, world_size: int = 1, enabled: bool = True, desc: str = "images") -> None:
        self.world_size = world_size
        self.bar = progress_bar(
            total or None,  # retrying errors: how many there are to retry is unknown, so count without a bar
            desc=desc,
            unit=" images",
            enabled=enabled,
            smoothing=0,  # the rate over the whole run, which the ETA needs, not the last few batches'
            delay=0.5,
            bar_format=_BAR_FORMAT if total else None,
        )

    def update(self, n: int) -> None:
        """``n`` more images done by this process."""
        self.bar.update(n * self.world_size)

    def close(self) -> None:
        """Draw the last state (if the bar showed at all) and end the line."""
        self.bar.close()

    def __enter__(self) -> BatchProgress:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
