"""``_manifest.json``: the job, the checkpoint, the shards and their status. The one reader (with its format check)
and writer of it; every change goes through ``updating_manifest``, under the folder's lock, rewritten atomically.

In object storage there is no lock: the manifest is written whole (one PUT) by the one process that prepares and
finalizes the run, from the part objects (the truth); workers never rewrite it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from ornis.errors import OrnisError
from ornis.inference.batch.layout import MANIFEST, MANIFEST_LOCK
from ornis.utils.locks import file_lock
from ornis.utils.storage import Location, RemotePath, read_bytes, write_bytes

MANIFEST_FORMAT = 1


class OutputFolderError(OrnisError):
    """The output folder holds another job's results (different model, inputs or options), or is not one."""


@dataclass
class ShardEntry:
    """One shard in the manifest. ``rows`` and ``errors`` are known once it is done."""

    id: int
    source: str  # "files", or the tar's path
    count: int  # samples planned
    status: str = "pending"
    rows: int | None = None
    errors: int | None = None

    def mark_done(self, rows: int, errors: int) -> None:
        """Its part file exists, with ``rows`` rows; its errors file lists ``errors`` files."""
        self.status, self.rows, self.errors = "done", rows, errors

    def mark_pending(self) -> None:
        """It has no part file (yet)."""
        self.status, self.rows, self.errors = "pending", None, None

    def to_json(self) -> dict[str, Any]:
        """Its entry in ``_manifest.json`` (``rows`` and ``errors`` only once done)."""
        d: dict[str, Any] = {"id": self.id, "source": self.source, "count": self.count, "status": self.status}
        if self.status == "done":
            d.update(rows=self.rows, errors=self.errors)
        return d


@dataclass
class Manifest:
    """The contents of ``_manifest.json``. ``attempt`` names the current claim round (``_claims/<attempt>/``)."""

    job: dict[str, Any]
    checkpoint: str
    checkpoint_sha256: str
    shards: list[ShardEntry] = field(default_factory=list)
    attempt: str | None = None

    @property
    def done_rows(self) -> int:
        """Rows in the part files of the done shards."""
        return sum(s.rows or 0 for s in self.shards if s.status == "done")

    @property
    def pending_count(self) -> int:
        """Samples in the shards not done yet."""
        return sum(s.count for s in self.shards if s.status != "done")

    def to_json(self) -> dict[str, Any]:
        """The contents of ``_manifest.json``."""
        d: dict[str, Any] = {
            "format": MANIFEST_FORMAT,
            "job": self.job,
            "checkpoint": self.checkpoint,
            "checkpoint_sha256": self.checkpoint_sha256,
            "shards": [s.to_json() for s in self.shards],
        }
        if self.attempt is not None:
            d["attempt"] = self.attempt
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], path: Location) -> Manifest:
        """Parse a manifest's JSON; ``OutputFolderError`` naming ``path`` for another format or a missing key."""
        if d.get("format") != MANIFEST_FORMAT:
            raise OutputFolderError(f"{path}: manifest format {d.get('format')!r}, expected {MANIFEST_FORMAT}")
        try:
            shards = [
                ShardEntry(s["id"], s["source"], s["count"], s["status"], s.get("rows"), s.get("errors"))
                for s in d["shards"]
            ]
            return cls(d["job"], d["checkpoint"], d["checkpoint_sha256"], shards, d.get("attempt"))
        except KeyError as e:
            raise OutputFolderError(f"{path}: manifest has no {e.args[0]!r} entry") from None


def read_manifest(out: Location) -> Manifest | None:
    """The manifest of output folder ``out``, ``None`` when there is none yet."""
    path = out / MANIFEST
    try:
        text = read_bytes(path).decode()
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise OutputFolderError(f"{path}: not a JSON manifest ({e})") from None
    return Manifest.from_json(data, path)


def load_manifest(out: Location) -> Manifest:
    """The manifest of a prepared output folder; ``OutputFolderError`` when it has none."""
    manifest = read_manifest(out)
    if manifest is None:
        raise OutputFolderError(f"{out}: no {MANIFEST}; call prepare_output(job) first")
    return manifest


def write_manifest(out: Location, manifest: Manifest) -> None:
    """Replace ``out``'s manifest atomically (hold ``manifest_lock`` around the read-modify-write)."""
    write_bytes(out / MANIFEST, json.dumps(manifest.to_json(), indent=1).encode("utf-8"))


@contextmanager
def manifest_lock(out: Location) -> Iterator[None]:
    """The folder's lock: every process that changes the manifest holds it (ranks, Ray tasks, other nodes). Object
    storage has none: there only the run's main process writes the manifest (see the module doc)."""
    if isinstance(out, RemotePath):
        yield
        return
    with file_lock(out / MANIFEST_LOCK):
        yield


@contextmanager
def updating_manifest(out: Location) -> Iterator[Manifest]:
    """Read the manifest under the lock, let the block change it, and write it back."""
    with manifest_lock(out):
        manifest = load_manifest(out)
        yield manifest
        write_manifest(out, manifest)
