"""The output folder over a run: prepared once (plan, manifest, a new claim attempt), finalized once (manifest
reconciled with the part files, every errors file merged into ``_errors.jsonl``)."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from ornis.data.datasets import Shard, plan_shards, write_plan
from ornis.inference.batch.job import BatchJob, BatchSummary, WorkerStats
from ornis.inference.batch.layout import (
    CLAIMS_DIR,
    ERRORS,
    ERRORS_DIR,
    FEATURES_DIR,
    MANIFEST,
    PLAN,
    errors_path,
    is_temporary,
    part_name,
    plan_errors_path,
)
from ornis.inference.batch.manifest import (
    Manifest,
    OutputFolderError,
    ShardEntry,
    load_manifest,
    manifest_lock,
    read_manifest,
    updating_manifest,
    write_manifest,
)
from ornis.inference.batch.model import ResolvedModel, resolve_model
from ornis.utils.distributed import DistInfo
from ornis.utils.fs import atomic_write_jsonl, read_jsonl


@dataclass(frozen=True)
class PreparedOutput:
    """What ``prepare_output`` found: how many images earlier runs already did, and the job's checkpoint."""

    skipped: int
    model: ResolvedModel


def prepare_output(job: BatchJob, model: ResolvedModel | None = None) -> PreparedOutput:
    """Resolve and hash the checkpoint (unless ``model`` is that already), plan the shards (or check that the folder
    holds this same job), and start a new claim attempt. Runs in rank 0 or the Ray driver, before any worker."""
    out = Path(job.out)
    model = model or resolve_model(job)
    # A bad input fails here, before the output folder is made
    planned = plan_shards(job.inputs, job.shard_size) if not (out / MANIFEST).exists() else None
    out.mkdir(parents=True, exist_ok=True)
    _remove_temporary_files(out)
    with manifest_lock(out):
        manifest = read_manifest(out)
        if manifest is not None:
            _check_same_job(out, manifest, job.identity(), model)
            manifest.checkpoint = os.fspath(model.path)  # the same bytes, maybe found elsewhere (another cache)
        else:
            shards, problems = planned or plan_shards(job.inputs, job.shard_size)
            write_plan(shards, out / PLAN)
            atomic_write_jsonl(
                plan_errors_path(out), [{"path": p.key, "reason": p.reason, "shard": None} for p in problems]
            )
            manifest = _new_manifest(job, model, shards)
        reconcile(out, manifest)
        manifest.attempt = uuid.uuid4().hex[:12]
        shutil.rmtree(out / CLAIMS_DIR, ignore_errors=True)
        (out / CLAIMS_DIR / manifest.attempt).mkdir(parents=True)
        write_manifest(out, manifest)
    return PreparedOutput(manifest.done_rows, model)


def _new_manifest(job: BatchJob, model: ResolvedModel, shards: list[Shard]) -> Manifest:
    entries = [ShardEntry(s.id, s.source, len(s.items)) for s in shards]
    return Manifest(job.identity(), os.fspath(model.path), model.sha256, entries)


def _check_same_job(out: Path, manifest: Manifest, identity: dict[str, Any], model: ResolvedModel) -> None:
    found = manifest.job
    diff = [f"{k}: folder has {found.get(k)!r}, this run {v!r}" for k, v in identity.items() if found.get(k) != v]
    if diff:
        raise OutputFolderError(
            f"{out} holds the results of another job ({'; '.join(diff)}); use another output folder"
        )
    if manifest.checkpoint_sha256 != model.sha256:
        raise OutputFolderError(
            f"{out} was written with a checkpoint of sha256 {manifest.checkpoint_sha256}, but {model.path} "
            f"now has sha256 {model.sha256}; use another output folder"
        )


def _remove_temporary_files(out: Path) -> None:
    # What a killed run was writing; no worker runs while the folder is being prepared
    for folder in (out, out / ERRORS_DIR, out / FEATURES_DIR):
        if folder.is_dir():
            for path in folder.iterdir():
                if is_temporary(path):
                    path.unlink(missing_ok=True)


def reconcile(out: Path, manifest: Manifest) -> None:
    """The part files are the truth: a shard whose part exists is done (even if the manifest missed it)."""
    for shard in manifest.shards:
        part = out / part_name(shard.id)
        if part.exists():
            shard.mark_done(pq.ParquetFile(part).metadata.num_rows, len(read_jsonl(errors_path(out, shard.id))))
        else:
            shard.mark_pending()


def finalize_output(
    job: BatchJob, totals: WorkerStats, *, skipped: int, started: float, dist: DistInfo | None = None
) -> BatchSummary:
    """The run's summary; in the main process (rank 0, the Ray driver) also reconcile the manifest with the part
    files and merge every errors file into ``_errors.jsonl``."""
    out = Path(job.out)
    dist = dist or DistInfo()
    records = 0
    if dist.is_main:
        with updating_manifest(out) as manifest:
            reconcile(out, manifest)
        records = _merge_errors(out, manifest)
    else:
        manifest = load_manifest(out)
    return BatchSummary(
        out=out,
        done=totals.images,
        skipped=skipped,
        errors=totals.errors,
        shards_done=sum(1 for s in manifest.shards if s.status == "done"),
        shards_total=len(manifest.shards),
        wall_s=time.perf_counter() - started,
        decode_s=totals.decode_s,
        wait_s=totals.wait_s,
        model_s=totals.model_s,
        loop_s=totals.loop_s,
        world_size=dist.world_size,
        error_records=records,
    )


def _merge_errors(out: Path, manifest: Manifest) -> int:
    lines = read_jsonl(plan_errors_path(out))
    for shard in manifest.shards:
        lines += read_jsonl(errors_path(out, shard.id))
    atomic_write_jsonl(out / ERRORS, lines)
    return len(lines)


def read_errors(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The errors file of an output folder: ``[{"path", "reason", "shard", "index"}, ...]``."""
    return read_jsonl(Path(out) / ERRORS)


def pending_shards(out: str | os.PathLike) -> list[int]:
    """Shards of a prepared output folder that have no part file yet."""
    out = Path(out)
    return [s.id for s in load_manifest(out).shards if not (out / part_name(s.id)).exists()]
