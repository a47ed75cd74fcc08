"""Which samples a worker decodes: shards claimed one at a time, cut into batches."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler

from ornis.inference.batch.layout import CLAIMS_DIR, errors_path, part_name
from ornis.inference.batch.manifest import Manifest, OutputFolderError, ShardEntry
from ornis.utils.storage import Location, RemotePath, location, read_jsonl


def check_claims_possible(out: Location | str, world_size: int, shard_ids: Sequence[int] | None = None) -> None:
    """``OutputFolderError`` for processes that would share an output folder in object storage by claiming shards:
    claims are exclusive creates of files, which only a POSIX folder gives. One process, or workers handed explicit
    ``shard_ids`` (Ray actors), need no claims."""
    if world_size > 1 and shard_ids is None and isinstance(location(out), RemotePath):
        raise OutputFolderError(
            f"{out}: {world_size} processes cannot share an output folder in object storage (shards are claimed "
            "through files, which needs a POSIX folder); run one process, hand each worker its shard_ids, or write "
            "to a shared file system"
        )


class ClaimingBatchSampler(Sampler[list[tuple[int, int]]]):
    """Batches of (shard, index) pairs, one shard after another. A shard is taken only if its part file is absent
    (or, retrying errors, lists failed files) and this process wins the exclusive create of its claim file; the
    DataLoader pulls batches lazily, so a rank claims its next shard only when it is ready for it. Batches never
    span two shards, so their make-up (and the floating-point result) does not depend on which rank ran them.

    With ``shard_ids`` it takes exactly those shards, without claiming; the one process of a run into object storage
    (``check_claims_possible``) takes every shard without a part, also without claiming. ``expected`` maps each shard
    taken to the indices handed out for it, so the writer knows when a shard is complete."""

    def __init__(
        self,
        out: Location | str,
        manifest: Manifest,
        batch_size: int,
        *,
        retry_errors: bool,
        shard_ids: Sequence[int] | None = None,
        rank: int = 0,
    ) -> None:
        self.out = location(out)
        self.rank = rank
        self.claims = self.out / CLAIMS_DIR / str(manifest.attempt)
        self.shards = [s for s in manifest.shards if shard_ids is None or s.id in shard_ids]
        self.batch_size = batch_size
        self.retry_errors = retry_errors
        self.claim = shard_ids is None and not isinstance(self.out, RemotePath)
        self.expected: dict[int, list[int]] = {}

    def _indices(self, shard: ShardEntry) -> list[int] | None:
        if not (self.out / part_name(shard.id)).exists():
            return list(range(shard.count))
        if self.retry_errors:
            failed = sorted({e["index"] for e in read_jsonl(errors_path(self.out, shard.id))})
            return failed or None
        return None

    def _claimed(self, shard_id: int) -> bool:
        if not self.claim:
            return True
        try:
            fd = os.open(self.claims / f"{shard_id:05d}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        except FileNotFoundError:
            raise OutputFolderError(
                f"{self.claims} was removed while this run was claiming shards (by a run that does not share claims, "
                "or by hand); the shards written so far are kept: run the same command again to finish"
            ) from None
        with os.fdopen(fd, "w") as f:  # who took it, for whoever debugs a slow shard
            f.write(f"rank {self.rank} host {socket.gethostname()} pid {os.getpid()}\n")
        return True

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for shard in self.shards:
            indices = self._indices(shard)
            if not indices or not self._claimed(shard.id):
                continue
            self.expected[shard.id] = indices
            for s in range(0, len(indices), self.batch_size):
                yield [(shard.id, i) for i in indices[s : s + self.batch_size]]
