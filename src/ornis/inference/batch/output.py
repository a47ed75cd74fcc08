"""The output folder over a run: prepared once (plan, manifest, a new claim attempt), finalized once (manifest
reconciled with the part files, every errors file merged into ``_errors.jsonl``).

An output folder in object storage (``s3://bucket/emb``) is prepared and finalized the same way, by the run's one
main process, without a lock, a lease or claims (a store has none): the plan, the manifest and the merged errors are
each written whole, and the part objects, listed, are the truth the manifest is reconciled from. Two runs started
into one such folder at once are not detected; they would do some shards twice (the same rows, the last PUT wins)."""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pyarrow.parquet as pq

from ornis.data.datasets import Shard, plan_shards, write_plan
from ornis.inference.batch.job import BatchJob, BatchSummary, WorkerStats, identity_diff
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
from ornis.inference.batch.lease import AttemptLease, is_live, owner, write_owner
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
from ornis.utils.storage import (
    Location,
    RemotePath,
    StorageError,
    list_names,
    location,
    open_input,
    read_jsonl,
    remove,
    remove_tree,
    storage_errors,
    write_jsonl,
)

T = TypeVar("T")
REMOTE_READS = 16  # objects read at once when a store's part footers or errors objects are gathered
FOOTER_BLOCK = 64 << 10  # a part's footer (its row count) in one ranged read


@dataclass(frozen=True)
class PreparedOutput:
    """What ``prepare_output`` found: how many images earlier runs already did, the job's checkpoint, this process's
    hold on the claim attempt (``release`` it when the run ends) and how many inputs planning found unreadable."""

    skipped: int
    model: ResolvedModel
    lease: AttemptLease | None = None
    problems: int = 0

    def release(self) -> None:
        """Let go of the claim attempt: once every process of the run has, the folder is free for a new attempt."""
        if self.lease is not None:
            self.lease.release()


def prepare_output(
    job: BatchJob, model: ResolvedModel | None = None, *, lease: AttemptLease | None = None, claims: bool = True
) -> PreparedOutput:
    """Resolve and hash the checkpoint (unless ``model`` is that already), plan the shards (or check that the folder
    holds this same job), and start a new claim attempt, or join the attempt of a run that is still working in the
    folder (see ``ornis.inference.batch.lease``). Runs in rank 0 or the Ray driver, before any worker; ``lease`` is
    the caller's hold from an earlier call, let go of first. ``claims=False`` (the Ray driver, which hands out the
    shards itself): no claim attempt, no ``_claims/`` folder and no lease; a run working in the folder is an error."""
    out = location(job.out)
    _check_output(out)
    model = model or resolve_model(job)
    # A bad input fails here, before the output folder is made
    planned = plan_shards(job.inputs, job.shard_size) if not (out / MANIFEST).exists() else None
    if isinstance(out, Path):
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputFolderError(f"{out}: cannot make the output folder ({e.strerror or e})") from None
    if lease is not None:
        lease.release()
    with manifest_lock(out):
        manifest = read_manifest(out)
        live = _is_live(out, manifest)
        if manifest is not None:
            reconcile(out, manifest)
            if not _same_job(out, manifest, job, model, live):
                _clear_folder(out)  # another job's, with no results and no live run: it blocks nothing
                manifest = planned = None
            else:
                manifest.checkpoint = os.fspath(model.path)  # the same bytes, maybe found elsewhere (another cache)
        problems = 0
        if manifest is None:
            shards, found = planned or plan_shards(job.inputs, job.shard_size)
            write_plan(shards, out / PLAN)
            records = [{"path": p.key, "reason": p.reason, "shard": None} for p in found]
            write_jsonl(plan_errors_path(out), records)
            manifest, problems = _new_manifest(job, model, shards), len(found)
        held = None
        if isinstance(out, Path) and claims:
            if not live:
                _start_attempt(out, manifest)
            held = AttemptLease(out / CLAIMS_DIR / str(manifest.attempt))
        else:
            if live:  # a run claiming shards here now: a driver that does not claim would do them again
                who = owner(out / CLAIMS_DIR / str(manifest.attempt))
                raise OutputFolderError(f"{out}: another run ({who}) is working in it; wait for it to end")
            if isinstance(out, Path):  # a Ray driver: what a killed run left is cleared, no new attempt
                _remove_temporary_files(out)
                shutil.rmtree(out / CLAIMS_DIR, ignore_errors=True)
            manifest.attempt = None  # no claims in object storage: the run's one process takes every shard
        write_manifest(out, manifest)
    return PreparedOutput(manifest.done_rows, model, held, problems)


def _check_output(out: Location) -> None:
    """Refuse an output that is not a folder, or one in a bucket that does not exist, before any work."""
    if isinstance(out, Path):
        if out.exists() and not out.is_dir():
            raise OutputFolderError(f"{out}: exists and is not a folder; the output must be a folder")
        return
    if out.is_file():
        raise OutputFolderError(f"{out}: is an object, not a folder (prefix); the output must be a folder")
    fs, path = out.fs_path()
    bucket = path.split("/", 1)[0]
    with storage_errors(out):
        if not fs.exists(bucket):
            raise StorageError(f"{out}: the bucket {bucket!r} does not exist (or these credentials cannot see it)")


def _is_live(out: Location, manifest: Manifest | None) -> bool:
    if not isinstance(out, Path) or manifest is None or manifest.attempt is None:
        return False  # object storage has no leases: nobody can be seen working there
    return is_live(out / CLAIMS_DIR / manifest.attempt)


def _start_attempt(out: Path, manifest: Manifest) -> None:
    """A new claim attempt in a local folder no process works in: what a killed run left is cleared."""
    _remove_temporary_files(out)  # what a killed run was writing; no process works here now
    manifest.attempt = uuid.uuid4().hex[:12]
    shutil.rmtree(out / CLAIMS_DIR, ignore_errors=True)
    (out / CLAIMS_DIR / manifest.attempt).mkdir(parents=True)
    write_owner(out / CLAIMS_DIR / manifest.attempt)


def _new_manifest(job: BatchJob, model: ResolvedModel, shards: list[Shard]) -> Manifest:
    entries = [ShardEntry(s.id, s.source, len(s.items)) for s in shards]
    return Manifest(job.identity(), os.fspath(model.path), model.sha256, entries)


def _same_job(out: Location, manifest: Manifest, job: BatchJob, model: ResolvedModel, live: bool) -> bool:
    """True when the folder holds this job; False when it holds another that neither has results nor runs (a
    failed run's); ``OutputFolderError`` when another job has results there or is running there."""
    diff = identity_diff(manifest.job, job.identity())
    if manifest.checkpoint_sha256 != model.sha256:
        diff.append(f"checkpoint sha256: folder has {manifest.checkpoint_sha256}, {model.path} has {model.sha256}")
    if not diff:
        return True
    if live:
        who = owner(out / CLAIMS_DIR / str(manifest.attempt))
        raise OutputFolderError(
            f"{out}: another run ({who}) is writing a different job into it ({'; '.join(diff)}); wait for it to "
            "end or use another output folder"
        )
    if any(s.status == "done" for s in manifest.shards):
        raise OutputFolderError(
            f"{out} holds the results of another job ({'; '.join(diff)}); use another output folder"
        )
    return False


def _clear_folder(out: Location) -> None:
    for name in (PLAN, ERRORS, MANIFEST):
        remove(out / name)
    for name in (ERRORS_DIR, FEATURES_DIR, CLAIMS_DIR):
        remove_tree(out / name)


def _remove_temporary_files(out: Path) -> None:
    # What a killed run was writing; no worker runs while the folder is being prepared
    for folder in (out, out / ERRORS_DIR, out / FEATURES_DIR):
        if folder.is_dir():
            for path in folder.iterdir():
                if is_temporary(path):
                    path.unlink(missing_ok=True)


def reconcile(out: Location, manifest: Manifest, *, recount: bool = False) -> None:
    """The part files are the truth: a shard whose part exists is done (even if the manifest missed it). In object
    storage one listing says which parts exist, and only parts the manifest does not count yet (all of them with
    ``recount``, when a retry may have rewritten them) have their footer and errors read, several at once."""
    if isinstance(out, Path):
        for shard in manifest.shards:
            part = out / part_name(shard.id)
            if part.exists():
                shard.mark_done(pq.ParquetFile(part).metadata.num_rows, len(read_jsonl(errors_path(out, shard.id))))
            else:
                shard.mark_pending()
        return
    parts = set(list_names(out))
    for shard in manifest.shards:
        if part_name(shard.id) not in parts:
            shard.mark_pending()
    todo = [s for s in manifest.shards if part_name(s.id) in parts and (recount or s.status != "done")]
    counts = _gather(lambda s: (_part_rows(out / part_name(s.id)), len(read_jsonl(errors_path(out, s.id)))), todo)
    for shard, (rows, errors) in zip(todo, counts):
        shard.mark_done(rows, errors)


def _part_rows(part: RemotePath) -> int:
    with open_input(part, FOOTER_BLOCK) as f:
        return pq.ParquetFile(f).metadata.num_rows


def _gather(read: Callable[[Any], T], items: Iterable[Any]) -> list[T]:
    """``read`` of each item, several at once (each one mostly waits on a request to the store)."""
    with ThreadPoolExecutor(REMOTE_READS) as pool:
        return list(pool.map(read, items))


def finalize_output(
    job: BatchJob,
    totals: WorkerStats,
    *,
    skipped: int,
    started: float,
    dist: DistInfo | None = None,
    problems: int = 0,
) -> BatchSummary:
    """The run's summary; in the main process (rank 0, the Ray driver) also reconcile the manifest with the part
    files and merge every errors file into ``_errors.jsonl``. ``problems``: inputs this run's planning found
    unreadable, counted among its errors."""
    out = location(job.out)
    dist = dist or DistInfo()
    records = 0
    if dist.is_main:
        with updating_manifest(out) as manifest:
            reconcile(out, manifest, recount=job.retry_errors)
        records = _merge_errors(out, manifest)
    else:
        manifest = load_manifest(out)
    return BatchSummary(
        out=out,
        done=totals.images,
        skipped=skipped,
        errors=totals.errors + problems,
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


def _merge_errors(out: Location, manifest: Manifest) -> int:
    lines = read_jsonl(plan_errors_path(out))
    if isinstance(out, Path):
        for shard in manifest.shards:
            lines += read_jsonl(errors_path(out, shard.id))
    else:  # only the done shards': a killed run may have left the errors object of a shard it did not commit
        done = [s.id for s in manifest.shards if s.status == "done"]
        for shard_lines in _gather(lambda i: read_jsonl(errors_path(out, i)), done):
            lines += shard_lines
    write_jsonl(out / ERRORS, lines)
    return len(lines)


def read_errors(out: str | os.PathLike) -> list[dict[str, Any]]:
    """The errors file of an output folder: ``[{"path", "reason", "shard", "index"}, ...]``."""
    return read_jsonl(location(out) / ERRORS)


def pending_shards(out: str | os.PathLike) -> list[int]:
    """Shards of a prepared output folder that have no part file yet."""
    where = location(out)
    if isinstance(where, RemotePath):
        parts = set(list_names(where))
        return [s.id for s in load_manifest(where).shards if part_name(s.id) not in parts]
    return [s.id for s in load_manifest(where).shards if not (where / part_name(s.id)).exists()]
