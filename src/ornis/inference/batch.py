"""Batch embedding and classification of image collections into Parquet, resumable and shardable.

::

    from ornis.inference.batch import embed, classify

    summary = embed(["photos/", "more/*.jpg", "shards/*.tar"], model="hieradet_small_sam2_1", out="emb/")
    summary = classify(["list.csv"], model="flexivit_reg1_s16_rms_ls_dino-v2-il-all", top_k=5, out="cls/")

The output folder holds

- ``part-NNNNN.parquet``, one per shard, one row an image: ``path`` (or ``<tar>:<key>``), then ``embedding``
  (fixed-size list of float32, or float16 with ``embedding_dtype="float16"``) or ``labels`` and ``probabilities``
  (the top k, best first), then ``width`` and ``height`` of the decoded image. The file metadata holds the model
  name, the checkpoint's sha256, the task and the preprocessing (keys ``ornis.*``). Rows are in input order.
- ``_manifest.json``: the job, the shards and their status (rewritten atomically, under a lock).
- ``_errors.jsonl``: one line a file that was skipped, ``{"path", "reason", "shard", "index"}``.
- ``_plan.parquet`` (the samples of each shard), ``_errors/`` (each shard's errors), ``_features/``
  (``features=STAGE``: ``part-NNNNN.STAGE.npy``, rows as in the part file) and ``_claims/``.

The leading underscores keep these out of ``pandas.read_parquet(out)`` / ``pyarrow.dataset``, which then read
exactly the rows.

The unit of work is a shard (a chunk of ``shard_size`` loose files, or one tar): it is written to a temporary file
and renamed into ``part-NNNNN.parquet``, which is the commit. Running the same call again skips the shards that
have a part file and does the rest, so a killed run (even SIGKILL) finishes with every good image exactly once.
``retry_errors=True`` re-tries only the files that failed and merges the ones that now decode into their part.

Under ``torchrun`` every rank runs the same call: rank 0 plans, then each rank claims shards one at a time through an
exclusive-create file per shard (``_claims/<attempt>/NNNNN``), so fast ranks take more shards; the process group
(gloo) only carries barriers and the totals. ``ornis.inference.ray_runner`` runs the same worker as Ray tasks.

Preprocessing defaults to the checkpoint's ``classification_transform`` on ``open_rgb``'s RGB image, so rows equal
``infer_image``'s output; resizing runs in the DataLoader workers and the uint8 -> float scaling and normalisation
on the model's device (a quarter of the bytes through shared and pinned memory).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ornis.data.datasets import ShardDataset, collate_samples, plan_shards, read_plan_shard, write_plan
from ornis.data.decode import DecodeOptions
from ornis.data.transforms import classification_transform
from ornis.errors import OrnisError

log = logging.getLogger(__name__)

MANIFEST = "_manifest.json"
PLAN = "_plan.parquet"
ERRORS = "_errors.jsonl"
TASKS = ("embed", "classify")
PRECISIONS = ("auto", "float32", "bfloat16", "float16")
MANIFEST_FORMAT = 1


class OutputFolderError(OrnisError):
    """The output folder holds another job's results (different model, inputs or options)."""


@dataclass(frozen=True)
class BatchJob:
    """Everything that defines a batch run. The fields in ``IDENTITY`` must match to resume into a folder; the rest
    (device, batch size, workers...) can change between runs."""

    inputs: tuple[str, ...]
    out: str
    model: str
    task: str = "embed"
    top_k: int = 5
    shard_size: int = 1000
    embedding_dtype: str = "float32"
    features: str | None = None
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    network: str | None = None
    precision: str = "auto"  # bf16 autocast on CUDA, float32 on CPU
    batch_size: int | None = None  # 256 on CUDA, 32 on CPU
    num_workers: int | None = None  # from the CPU count
    device: str | None = None  # cuda:<local rank> when there is a GPU
    compile: bool = False
    channels_last: bool | None = None  # on CUDA by default
    # Plain JPEGs decoded in batches on the model's device (nvJPEG on CUDA) and resized there (bicubic, antialiased):
    # for when the CPUs cannot decode as fast as the GPU embeds. Pixels differ from Pillow's by a level or so.
    decode_on_device: bool = False
    retry_errors: bool = False
    progress: bool | None = None  # default: when stderr is a terminal

    IDENTITY = (
        "inputs",
        "model",
        "task",
        "top_k",
        "shard_size",
        "embedding_dtype",
        "features",
        "decode",
        "network",
        "decode_on_device",
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.embedding_dtype not in ("float32", "float16"):
            raise ValueError(f"embedding_dtype must be float32 or float16, got {self.embedding_dtype!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {self.top_k}")

    def identity(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in self.IDENTITY}
        d["inputs"] = list(self.inputs)
        d["decode"] = asdict(self.decode)
        return d


@dataclass
class WorkerStats:
    images: int = 0
    errors: int = 0
    shards: int = 0
    decode_s: float = 0.0  # CPU seconds decoding and resizing, summed over DataLoader workers
    wait_s: float = 0.0  # seconds the model loop waited for decoded batches
    model_s: float = 0.0  # seconds the model loop spent on the device (copies, forward, results)
    loop_s: float = 0.0  # from the first decoded batch to the end: the steady pipeline, without start-up
    wall_s: float = 0.0

    def add(self, other: WorkerStats) -> None:
        for k in ("images", "errors", "shards", "decode_s", "wait_s", "model_s"):
            setattr(self, k, getattr(self, k) + getattr(other, k))
        self.wall_s = max(self.wall_s, other.wall_s)
        self.loop_s = max(self.loop_s, other.loop_s)


@dataclass
class BatchSummary:
    """What a run did. ``done`` images embedded / classified now, ``skipped`` already done before (resume)."""

    out: Path
    done: int
    skipped: int
    errors: int
    shards_done: int
    shards_total: int
    wall_s: float
    decode_s: float
    wait_s: float
    model_s: float
    loop_s: float = 0.0
    world_size: int = 1
    error_records: int = 0  # lines in the errors file, all runs together

    @property
    def images_per_s(self) -> float:
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.done} images done, {self.skipped} skipped (already done), {self.errors} errors "
            f"({self.error_records} listed in {self.out / ERRORS}); {self.shards_done}/{self.shards_total} shards; "
            f"{self.images_per_s:.1f} images/s over {self.wall_s:.1f} s on {self.world_size} process(es); "
            f"decoding {self.decode_s:.1f} CPU-s in workers, waiting for data {self.wait_s:.1f} s, model {self.model_s:.1f} s"
        )


# -- public entry points ------------------------------------------------------------------------------------------
def embed(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    model: str | os.PathLike,
    out: str | os.PathLike,
    **options: Any,
) -> BatchSummary:
    """Embed every image of ``inputs`` (folders, globs, file lists, ``.tar`` shards) with ``model`` (a published
    name or a checkpoint path) into Parquet parts under ``out``. ``options`` are the other ``BatchJob`` fields."""
    return run_batch(make_job(inputs, model=model, out=out, task="embed", **options))


def classify(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    model: str | os.PathLike,
    out: str | os.PathLike,
    top_k: int = 5,
    **options: Any,
) -> BatchSummary:
    """Like ``embed``, writing the top ``top_k`` labels and probabilities of each image instead."""
    return run_batch(make_job(inputs, model=model, out=out, task="classify", top_k=top_k, **options))


def make_job(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    model: str | os.PathLike,
    out: str | os.PathLike,
    **options: Any,
) -> BatchJob:
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    decode = options.pop("decode", None) or DecodeOptions(
        exif_transpose=options.pop("exif_transpose", False),
        composite_alpha=options.pop("composite_alpha", False),
        **({"max_pixels": options.pop("max_pixels")} if options.get("max_pixels") else {}),
    )
    options.pop("max_pixels", None)
    return BatchJob(
        inputs=tuple(os.fspath(i) for i in inputs), out=os.fspath(out), model=os.fspath(model), decode=decode, **options
    )


def run_batch(job: BatchJob) -> BatchSummary:
    """Run ``job`` in this process, or as one rank of a ``torchrun`` group (detected from the environment)."""
    dist = DistContext.from_env()
    started = time.perf_counter()
    try:
        resumed, failure = 0, None
        if dist.rank == 0:
            try:
                resumed = prepare_output(job)
            except Exception as e:  # noqa: BLE001 - the other ranks must not wait for a plan that will never come
                failure = e
        if not dist.all_ok(failure is None):
            if failure is not None:
                raise failure
            raise OrnisError(f"rank 0 could not prepare {job.out}; see its error")
        stats = run_worker(job, rank=dist.rank, world_size=dist.world_size, local_rank=dist.local_rank)
        totals = dist.sum_stats(stats)
        dist.barrier()
        summary = finalize_output(job, totals, skipped=resumed, world_size=dist.world_size, started=started)
        if dist.rank == 0:
            log.info("%s", summary)
        return summary
    finally:
        dist.close()


# -- the output folder: plan, manifest, claims --------------------------------------------------------------------
def prepare_output(job: BatchJob) -> int:
    """Plan the shards (or check that the folder holds this same job), start a new claim attempt, and return how
    many images earlier runs already did. Runs once per job, in rank 0 or the Ray driver."""
    from ornis.weights.checkpoint import sha256_file

    out = Path(job.out)
    model_path = _model_path(job)
    identity = job.identity()
    sha = sha256_file(model_path)  # once a run, here only: the workers read it from the manifest
    # A bad input fails here, before the output folder is made
    planned = plan_shards(job.inputs, job.shard_size) if not (out / MANIFEST).exists() else None
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob(".*.tmp"):
        tmp.unlink()
    with _manifest_lock(out):
        manifest = _read_manifest(out)
        if manifest is not None:
            _check_same_job(out, manifest["job"], identity)
            if manifest["checkpoint_sha256"] != sha:
                raise OutputFolderError(
                    f"{out} was written with a checkpoint of sha256 {manifest['checkpoint_sha256']}, but {model_path} "
                    f"now has sha256 {sha}; use another output folder"
                )
        else:
            shards, problems = planned or plan_shards(job.inputs, job.shard_size)
            write_plan(shards, out / PLAN)
            (out / "_errors").mkdir(exist_ok=True)
            _write_jsonl(
                out / "_errors" / "plan.jsonl", [{"path": p.key, "reason": p.reason, "shard": None} for p in problems]
            )
            manifest = {
                "format": MANIFEST_FORMAT,
                "job": identity,
                "checkpoint": os.fspath(model_path),
                "checkpoint_sha256": sha,
                "shards": [
                    {"id": s.id, "source": s.source, "count": len(s.items), "status": "pending"} for s in shards
                ],
            }
        _reconcile(out, manifest)
        attempt = uuid.uuid4().hex[:12]
        manifest["attempt"] = attempt
        shutil.rmtree(out / "_claims", ignore_errors=True)
        (out / "_claims" / attempt).mkdir(parents=True)
        _write_json_atomic(out / MANIFEST, manifest)
    return sum(s.get("rows", 0) for s in manifest["shards"] if s["status"] == "done")


def _model_path(job: BatchJob) -> Path:
    path = Path(job.model)
    if path.is_file():
        return path
    from ornis.loading import is_checkpoint_path
    from ornis.weights.cache import resolve_weights

    if is_checkpoint_path(job.model):
        raise OrnisError(f"{job.model}: no such checkpoint file")
    return resolve_weights(job.model, "pt")


def _check_same_job(out: Path, found: dict[str, Any], expected: dict[str, Any]) -> None:
    diff = [f"{k}: folder has {found.get(k)!r}, this run {v!r}" for k, v in expected.items() if found.get(k) != v]
    if diff:
        raise OutputFolderError(
            f"{out} holds the results of another job ({'; '.join(diff)}); use another output folder"
        )


def _reconcile(out: Path, manifest: dict[str, Any]) -> None:
    """The part files are the truth: a shard whose part exists is done (even if the manifest missed it)."""
    for shard in manifest["shards"]:
        part = out / part_name(shard["id"])
        if part.exists():
            shard.update(
                status="done",
                rows=pq.ParquetFile(part).metadata.num_rows,
                errors=len(_read_jsonl(_errors_path(out, shard["id"]))),
            )
        else:
            shard.update(status="pending")
            shard.pop("rows", None)
            shard.pop("errors", None)


def finalize_output(
    job: BatchJob, totals: WorkerStats, *, skipped: int, world_size: int, started: float
) -> BatchSummary:
    out = Path(job.out)
    manifest = _read_manifest(out)
    assert manifest is not None
    records = 0
    if DistContext.from_env(init=False).rank == 0:
        with _manifest_lock(out):
            manifest = _read_manifest(out)
            assert manifest is not None
            _reconcile(out, manifest)
            _write_json_atomic(out / MANIFEST, manifest)
        lines = _read_jsonl(out / "_errors" / "plan.jsonl")
        for shard in manifest["shards"]:
            lines += _read_jsonl(_errors_path(out, shard["id"]))
        _write_jsonl(out / ERRORS, lines)
        records = len(lines)
    done = sum(1 for s in manifest["shards"] if s["status"] == "done")
    return BatchSummary(
        out=out,
        done=totals.images,
        skipped=skipped,
        errors=totals.errors,
        shards_done=done,
        shards_total=len(manifest["shards"]),
        wall_s=time.perf_counter() - started,
        decode_s=totals.decode_s,
        wait_s=totals.wait_s,
        model_s=totals.model_s,
        loop_s=totals.loop_s,
        world_size=world_size,
        error_records=records,
    )


def part_name(shard_id: int) -> str:
    return f"part-{shard_id:05d}.parquet"


def _errors_path(out: Path, shard_id: int) -> Path:
    return out / "_errors" / f"part-{shard_id:05d}.jsonl"


@contextlib.contextmanager
def _manifest_lock(out: Path) -> Iterator[None]:
    with open(out / "_manifest.lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _read_manifest(out: Path) -> dict[str, Any] | None:
    path = out / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    if manifest.get("format") != MANIFEST_FORMAT:
        raise OutputFolderError(f"{path}: manifest format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
    return manifest


def _write_json_atomic(path: Path, obj: Any) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _write_jsonl(path: Path, lines: list[dict[str, Any]]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    os.replace(tmp, path)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_errors(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The errors file of an output folder: ``[{"path", "reason", "shard", "index"}, ...]``."""
    return _read_jsonl(Path(out) / ERRORS)


# -- shards handed to the DataLoader ------------------------------------------------------------------------------
class ClaimingBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (shard, index) pairs, one shard after another. A shard is taken only if its part file is absent
    (or, retrying errors, lists failed files) and this process wins the exclusive create of its claim file; the
    DataLoader pulls batches lazily, so a rank claims its next shard only when it is ready for it. Batches never
    span two shards, so their make-up (and the floating-point result) does not depend on which rank ran them."""

    def __init__(
        self,
        out: Path,
        manifest: dict[str, Any],
        batch_size: int,
        *,
        retry_errors: bool,
        shard_ids: Sequence[int] | None = None,
        rank: int = 0,
    ) -> None:
        self.out = out
        self.rank = rank
        self.claims = out / "_claims" / manifest["attempt"]
        self.shards = [s for s in manifest["shards"] if shard_ids is None or s["id"] in shard_ids]
        self.batch_size = batch_size
        self.retry_errors = retry_errors
        self.claim = shard_ids is None
        self.expected: dict[int, list[int]] = {}  # shard -> the indices handed out for it, once claimed

    def _indices(self, shard: dict[str, Any]) -> list[int] | None:
        part = self.out / part_name(shard["id"])
        if not part.exists():
            return list(range(shard["count"]))
        if self.retry_errors:
            failed = sorted({e["index"] for e in _read_jsonl(_errors_path(self.out, shard["id"]))})
            return failed or None
        return None

    def _claimed(self, shard_id: int) -> bool:
        if not self.claim:
            return True
        try:
            fd = os.open(self.claims / f"{shard_id:05d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:  # who took it, for whoever debugs a slow shard
            f.write(f"rank {self.rank} host {socket.gethostname()} pid {os.getpid()}\n")
        return True

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for shard in self.shards:
            indices = self._indices(shard)
            if not indices or not self._claimed(shard["id"]):
                continue
            self.expected[shard["id"]] = indices
            for s in range(0, len(indices), self.batch_size):
                yield [(shard["id"], i) for i in indices[s : s + self.batch_size]]


# -- the worker: what each rank / Ray task runs -------------------------------------------------------------------
def run_worker(
    job: BatchJob, *, rank: int = 0, world_size: int = 1, local_rank: int = 0, shard_ids: Sequence[int] | None = None
) -> WorkerStats:
    """Claim shards of a prepared output folder and process them until none is left. With ``shard_ids``, process
    exactly those shards (no claiming): the idempotent shard function. Returns this worker's counts and timings."""
    from ornis.loading import load_pretrained_model

    started = time.perf_counter()
    out = Path(job.out)
    manifest = _read_manifest(out)
    if manifest is None:
        raise OutputFolderError(f"{out}: no {MANIFEST}; call prepare_output(job) first")
    device = torch.device(
        job.device or (f"cuda:{local_rank % torch.cuda.device_count()}" if torch.cuda.is_available() else "cpu")
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    net, info = load_pretrained_model(job.model, inference=True, network=job.network, device=device)
    runner = ModelRunner(net, info, job, device)
    batch_size = job.batch_size or (256 if device.type == "cuda" else 32)
    sampler = ClaimingBatchSampler(
        out, manifest, batch_size, retry_errors=job.retry_errors, shard_ids=shard_ids, rank=rank
    )
    dataset = ShardDataset(out / PLAN, runner.cpu_transform, job.decode, raw_jpeg=job.decode_on_device)
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    workers = default_num_workers(device, per_node) if job.num_workers is None else job.num_workers
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_samples,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
        worker_init_fn=_worker_init,
    )
    writer = ShardWriter(out, job, manifest, runner, sampler)
    stats = WorkerStats()
    pending_images = sum(s["count"] for s in manifest["shards"] if s["status"] != "done") if not job.retry_errors else 0
    progress = Progress(pending_images, world_size, enabled=rank == 0 and _progress_enabled(job))
    batches = iter(loader)
    previous: tuple[dict[str, Any], Callable[[], dict[str, np.ndarray]]] | None = None
    first_batch_at = None
    while True:
        t0 = time.perf_counter()
        batch = next(batches, None)
        stats.wait_s += time.perf_counter() - t0
        if batch is not None and first_batch_at is None:
            first_batch_at = time.perf_counter()
        t1 = time.perf_counter()
        current = None
        if batch is not None:
            pixels = runner.decode_jpegs(batch) if batch["jpeg"] else batch["pixels"]
            current = (batch, runner.launch(pixels) if pixels is not None else dict)
        if previous is not None:  # read the last batch's rows while this one runs on the device
            done, wait = previous
            results = wait()
            stats.model_s += time.perf_counter() - t1
            stats.decode_s += done["decode_s"]
            stats.images += len(done["key"])
            stats.errors += len(done["errors"])
            stats.shards += writer.add(done, results)
            progress.update(done["count"])
        else:
            stats.model_s += time.perf_counter() - t1
        if current is None:
            break
        previous = current
    progress.close()
    stats.wall_s = time.perf_counter() - started
    stats.loop_s = time.perf_counter() - first_batch_at if first_batch_at else 0.0
    return stats


def default_num_workers(device: torch.device, processes_per_node: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    per_process = max(1, cpus // max(1, processes_per_node))
    # On a GPU the CPUs only decode; on CPU the model needs them too
    return min(32, max(1, per_process - 1)) if device.type == "cuda" else min(4, max(1, per_process // 2))


def _worker_init(worker_id: int) -> None:
    # Decoding is one image per worker at a time; torch's own threads would only compete with the other workers
    torch.set_num_threads(1)


def split_transform(
    transform: Callable[[Any], torch.Tensor],
) -> tuple[Callable[[Any], torch.Tensor], tuple[list[float], list[float]] | None]:
    """A ``classification_transform`` cut before its uint8 -> float scaling and normalisation, which then run on the
    model's device as the same torchvision functions. Returns (worker part, (mean, std)); other transforms are
    returned whole with ``None``."""
    steps = getattr(transform, "transforms", None)
    if (
        isinstance(transform, v2.Compose)
        and steps is not None
        and len(steps) >= 3
        and isinstance(steps[-3], v2.PILToTensor)
        and isinstance(steps[-2], v2.ToDtype)
        and isinstance(steps[-1], v2.Normalize)
        and steps[-2].scale
    ):
        return v2.Compose(list(steps[:-2])), (list(steps[-1].mean), list(steps[-1].std))
    return transform, None


class ModelRunner:
    """A batch of worker output (uint8 or float) -> the rows' arrays, on the model's device."""

    def __init__(self, net: torch.nn.Module, info: Any, job: BatchJob, device: torch.device) -> None:
        from ornis.weights.checkpoint import get_size_from_signature

        self.net = net
        self.job = job
        self.device = device
        size = get_size_from_signature(info.signature)
        self.size = size
        self.transform = classification_transform(size, info.rgb_stats)
        self.cpu_transform, self.stats = split_transform(self.transform)
        if job.decode_on_device and self.stats is None:
            raise OrnisError("decode_on_device needs the standard classification_transform")
        self.preprocessing = {
            "transform": "classification_transform",
            "size": list(size),
            "rgb_stats": {k: list(v) for k, v in info.rgb_stats.items()},
            "resize": "exact (H, W), bicubic, antialiased; center_crop 1.0",
            "jpeg_decoding": "torchvision decode_jpeg on the model's device" if job.decode_on_device else "Pillow",
            **asdict(job.decode),
        }
        self.idx_to_class = {v: k for k, v in info.class_to_idx.items()}
        stages = list(getattr(net, "return_stages", []))
        if job.features and job.features not in stages:
            raise OrnisError(
                f"{job.model}: no feature map {job.features!r}; this model has {', '.join(stages) or 'none'}"
            )
        if job.task == "classify" and getattr(net, "num_classes", 0) < 1:
            raise OrnisError(f"{job.model}: the model has no classification head (num_classes=0); use embed")
        precision = job.precision
        if precision == "auto":
            precision = "bfloat16" if device.type == "cuda" else "float32"
        self.precision = precision
        self.autocast = precision != "float32"
        self.channels_last = device.type == "cuda" if job.channels_last is None else job.channels_last
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        step: Callable[[torch.Tensor], dict[str, torch.Tensor]] = self._step
        if job.compile:
            step = torch.compile(self._step)
        self.step = step
        self.max_batch = 0

    def _step(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        emb = self.net.embedding(x)
        res = {"embedding": emb}
        if self.job.task == "classify":
            res["probabilities"] = F.softmax(self.net.classify(emb).float(), dim=1)
        if self.job.features:
            res["features"] = self.net.detection_features(x)[self.job.features]
        return res

    def decode_jpegs(self, batch: dict[str, Any]) -> torch.Tensor | None:
        """Decode the batch's JPEG bytes on the device and resize them to the model's size as uint8, after the
        worker-decoded pixels. A file the decoder rejects moves from the batch's rows to its errors."""
        from torchvision.io import ImageReadMode, decode_jpeg

        jpegs = batch["jpeg"]
        try:
            images: list[torch.Tensor | None] = list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:  # one bad file fails the whole batched call: find it
            images = []
            for j, data in enumerate(jpegs):
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
                except RuntimeError as e:
                    images.append(None)
                    batch.setdefault("_device_errors", []).append(
                        (j, f"corrupt or truncated JPEG ({str(e).splitlines()[-1].split(', ')[-1][:200]})")
                    )
        first = len(batch["key"]) - len(jpegs)
        for j, reason in reversed(batch.pop("_device_errors", [])):
            row = first + j
            batch["errors"].append((batch["shard"][row], batch["index"][row], batch["key"][row], reason))
            for name in ("shard", "index", "key", "width", "height"):
                del batch[name][row]
        kept = [im for im in images if im is not None]
        parts = [batch["pixels"].to(self.device, non_blocking=True)] if batch["pixels"] is not None else []
        if kept:
            parts.append(self._resize(kept))
        return torch.cat(parts) if parts else None

    def _resize(self, images: list[torch.Tensor]) -> torch.Tensor:
        h, w = self.size
        out = torch.empty((len(images), 3, h, w), dtype=torch.uint8, device=self.device)
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for j, im in enumerate(images):
            by_shape.setdefault(tuple(im.shape), []).append(j)
        for indices in by_shape.values():  # photos share a few sizes: one interpolation per size
            x = torch.stack([images[j] for j in indices]).float()
            x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
            out[indices] = x.round_().clamp_(0, 255).to(torch.uint8)
        return out

    def launch(self, pixels: torch.Tensor) -> Callable[[], dict[str, np.ndarray]]:
        """Start the batch on the device and return a function that waits for its rows. On CUDA the results come
        back through non-blocking copies, so the loop can hand the next batch to the GPU before reading these."""
        n = pixels.shape[0]
        x = pixels.to(self.device, non_blocking=True)
        if self.stats is not None:
            x = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), self.stats[0], self.stats[1])
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.job.compile and n < self.max_batch:
            # Pad the short last batch of a shard to the usual size so the compiled graph is reused
            x = torch.cat([x, x[-1:].expand(self.max_batch - n, *x.shape[1:])])
        self.max_batch = max(self.max_batch, n)
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=getattr(torch, self.precision), enabled=self.autocast),
        ):
            res = self.step(x)
            outputs: dict[str, torch.Tensor] = {}
            if self.job.task == "embed":
                outputs["embedding"] = res["embedding"][:n].float()
            else:
                k = min(self.job.top_k, res["probabilities"].shape[1])
                outputs["probabilities"], outputs["label_ids"] = res["probabilities"][:n].topk(k, dim=1)
            if "features" in res:
                outputs["features"] = res["features"][:n].float()
            on_host = {k: v.to("cpu", non_blocking=True) for k, v in outputs.items()}
        done = torch.cuda.Event() if self.device.type == "cuda" else None
        if done is not None:
            done.record()

        def wait() -> dict[str, np.ndarray]:
            if done is not None:
                done.synchronize()
            return {k: v.numpy() for k, v in on_host.items()}

        return wait

    def __call__(self, pixels: torch.Tensor) -> dict[str, np.ndarray]:
        return self.launch(pixels)()


class ShardWriter:
    """Collects rows per shard and commits a shard (errors, features, then the part file by rename) once all of its
    samples have come back from the DataLoader."""

    def __init__(
        self, out: Path, job: BatchJob, manifest: dict[str, Any], runner: ModelRunner, sampler: ClaimingBatchSampler
    ) -> None:
        self.out = out
        self.job = job
        self.runner = runner
        self.sampler = sampler
        self.rows: dict[int, list[tuple[int, str, int, int, dict[str, np.ndarray]]]] = {}
        self.errors: dict[int, list[dict[str, Any]]] = {}
        self.seen: dict[int, int] = {}
        self.metadata = {
            "ornis.model": job.model,
            "ornis.network": runner.net.name,
            "ornis.checkpoint_sha256": manifest["checkpoint_sha256"],
            "ornis.task": job.task,
            "ornis.precision": runner.precision,
            "ornis.preprocessing": json.dumps(runner.preprocessing),
        }

    def add(self, batch: dict[str, Any], results: dict[str, np.ndarray]) -> int:
        touched = set()
        for j, (shard, index, key, w, h) in enumerate(
            zip(batch["shard"], batch["index"], batch["key"], batch["width"], batch["height"])
        ):
            self.rows.setdefault(shard, []).append((index, key, w, h, {k: v[j] for k, v in results.items()}))
            touched.add(shard)
        for shard, index, key, reason in batch["errors"]:
            self.errors.setdefault(shard, []).append({"path": key, "reason": reason, "shard": shard, "index": index})
            touched.add(shard)
        for shard, index, *_ in [*zip(batch["shard"], batch["index"]), *batch["errors"]]:
            self.seen[shard] = self.seen.get(shard, 0) + 1
        committed = 0
        for shard in sorted(touched):
            if self.seen[shard] == len(self.sampler.expected[shard]):
                self.commit(shard)
                committed += 1
        return committed

    def commit(self, shard: int) -> None:
        rows = self.rows.pop(shard, [])
        errors = self.errors.pop(shard, [])
        self.seen.pop(shard)
        part = self.out / part_name(shard)
        if part.exists():  # retrying errors: keep the rows already there, add the files that decode now
            rows = self._merge_existing(shard, part, rows)
        rows.sort(key=lambda r: r[0])
        errors.sort(key=lambda e: e["index"])
        table = self._table(rows)
        if self.job.features:
            folder = self.out / "_features"
            folder.mkdir(exist_ok=True)
            feats = np.stack([r[4]["features"] for r in rows]) if rows else np.zeros((0,), np.float32)
            dtype = np.float16 if self.job.embedding_dtype == "float16" else np.float32
            dst = folder / f"part-{shard:05d}.{self.job.features}.npy"
            tmp = folder / f".{dst.name}.{os.getpid()}.tmp"
            with open(tmp, "wb") as f:
                np.save(f, feats.astype(dtype))
            os.replace(tmp, dst)
        _write_jsonl(_errors_path(self.out, shard), errors)
        tmp = self.out / f".{part.name}.{os.getpid()}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, part)  # the commit: from here on the shard is done
        with _manifest_lock(self.out):
            manifest = _read_manifest(self.out)
            assert manifest is not None
            entry = manifest["shards"][shard]
            entry.update(status="done", rows=len(rows), errors=len(errors))
            _write_json_atomic(self.out / MANIFEST, manifest)

    def _merge_existing(self, shard: int, part: Path, new_rows: list) -> list:
        order = {item.key: i for i, item in enumerate(read_plan_shard(self.out / PLAN, shard))}
        old = pq.read_table(part).to_pylist()
        fresh = {r[1] for r in new_rows}
        feats = None
        if self.job.features:
            feats = np.load(self.out / "_features" / f"part-{shard:05d}.{self.job.features}.npy")
        merged = list(new_rows)
        for j, row in enumerate(old):
            if row["path"] in fresh:
                continue
            arrays: dict[str, np.ndarray] = {}
            if "embedding" in row:
                arrays["embedding"] = np.asarray(row["embedding"], np.float32)
            else:
                arrays["probabilities"] = np.asarray(row["probabilities"], np.float32)
                arrays["label_ids"] = np.asarray(row["label_ids"], np.int64)
            if feats is not None:
                arrays["features"] = feats[j]
            merged.append((order[row["path"]], row["path"], row["width"], row["height"], arrays))
        return merged

    def _table(self, rows: list) -> pa.Table:
        cols: dict[str, pa.Array] = {"path": pa.array([r[1] for r in rows], pa.string())}
        if self.job.task == "embed":
            dim = self.runner.net.embedding_size
            value_type = pa.float16() if self.job.embedding_dtype == "float16" else pa.float32()
            values = (
                np.stack([r[4]["embedding"] for r in rows]).astype(value_type.to_pandas_dtype())
                if rows
                else np.zeros((0, dim))
            )
            cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1), value_type), dim)
        else:
            k = min(self.job.top_k, self.runner.net.num_classes)
            ids = np.stack([r[4]["label_ids"] for r in rows]).astype(np.int32) if rows else np.zeros((0, k), np.int32)
            probs = (
                np.stack([r[4]["probabilities"] for r in rows]).astype(np.float32)
                if rows
                else np.zeros((0, k), np.float32)
            )
            labels = [self.runner.idx_to_class.get(int(i), str(int(i))) for i in ids.reshape(-1)]
            cols["labels"] = pa.FixedSizeListArray.from_arrays(pa.array(labels, pa.string()), k)
            cols["probabilities"] = pa.FixedSizeListArray.from_arrays(pa.array(probs.reshape(-1), pa.float32()), k)
            cols["label_ids"] = pa.FixedSizeListArray.from_arrays(pa.array(ids.reshape(-1), pa.int32()), k)
        cols["width"] = pa.array([r[2] for r in rows], pa.int32())
        cols["height"] = pa.array([r[3] for r in rows], pa.int32())
        table = pa.table(cols)
        return table.replace_schema_metadata(self.metadata)


# -- torchrun -----------------------------------------------------------------------------------------------------
@dataclass
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @classmethod
    def from_env(cls, init: bool = True) -> DistContext:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        ctx = cls(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
        if init and world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                # gloo even on GPUs: the group only carries barriers and a few numbers
                dist.init_process_group("gloo")
                ctx.owns_group = True
        return ctx

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def all_ok(self, ok: bool) -> bool:
        if self.world_size == 1:
            return ok
        t = torch.tensor([0.0 if ok else 1.0])
        torch.distributed.all_reduce(t)
        return t.item() == 0.0

    def sum_stats(self, stats: WorkerStats) -> WorkerStats:
        if self.world_size == 1:
            return stats
        keys = ("images", "errors", "shards", "decode_s", "wait_s", "model_s")
        t = torch.tensor([float(getattr(stats, k)) for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        longest = torch.tensor([stats.wall_s, stats.loop_s], dtype=torch.float64)
        torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX)
        counts = ("images", "errors", "shards")
        total = WorkerStats(**{k: (int(v) if k in counts else float(v)) for k, v in zip(keys, t.tolist())})
        total.wall_s, total.loop_s = longest.tolist()
        return total

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


# -- progress -----------------------------------------------------------------------------------------------------
def _progress_enabled(job: BatchJob) -> bool:
    return sys.stderr.isatty() if job.progress is None else job.progress


class Progress:
    """One line on stderr: images, images/s and ETA, redrawn at most twice a second. Under torchrun rank 0 draws it
    and scales its own rate by the number of ranks for the ETA."""

    def __init__(self, total: int, world_size: int = 1, enabled: bool = True) -> None:
        self.total = total
        self.world_size = world_size
        self.enabled = enabled
        self.count = 0
        self.start = time.perf_counter()
        self.last = 0.0

    def update(self, n: int) -> None:
        self.count += n
        now = time.perf_counter()
        if self.enabled and now - self.last >= 0.5:
            self.last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.count / max(now - self.start, 1e-9)
        remaining = max(0, self.total - self.count * self.world_size)
        eta = remaining / (rate * self.world_size) if rate > 0 else float("inf")
        eta_text = time.strftime("%H:%M:%S", time.gmtime(eta)) if eta != float("inf") else "--:--:--"
        done = self.count * self.world_size
        print(
            f"\r{done}/{self.total} images  {rate * self.world_size:.1f} images/s  ETA {eta_text}",
            end="",
            file=sys.stderr,
            flush=True,
        )

    def close(self) -> None:
        if self.enabled and self.count:
            self._draw(time.perf_counter())
            print(file=sys.stderr)
