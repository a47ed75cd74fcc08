"""The plan of a batch run: every input expanded into samples and cut into shards, deterministically (same inputs
and files, same shards), and kept on disk so that every worker, rank and resumed run reads the same plan.

Loose files (folders, images, globs, file lists; see :mod:`ornis.data.inputs`) are cut into shards of
``shard_size`` in input order, each file once; each tar is one shard of its own, its samples named
``<tar path>:<key>`` (see :mod:`ornis.data.tar`). A tar that cannot be read is not an error of the run: it becomes
an ``InputProblem`` for the errors file.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from ornis.data.inputs import expand_inputs
from ornis.data.tar import index_tar_samples
from ornis.utils.fs import atomic_path

PLAN_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("key", pa.string()), ("path", pa.string()), ("offset", pa.int64()), ("size", pa.int64())]
)


@dataclass(frozen=True)
class Item:
    """One sample: ``key`` is what the output row is called; a tar member also has its data offset and size."""

    key: str
    path: str
    offset: int = -1
    size: int = -1


@dataclass(frozen=True)
class Shard:
    """A unit of work: the samples one worker embeds and writes as one part file."""

    id: int
    source: str  # "files", or the tar's path
    items: tuple[Item, ...]


@dataclass(frozen=True)
class InputProblem:
    """A whole input that could not be read while planning (an unreadable tar); listed in the errors file."""

    key: str
    reason: str


def plan_shards(inputs: Sequence[str | os.PathLike], shard_size: int = 1000) -> tuple[list[Shard], list[InputProblem]]:
    """Every input expanded into samples, cut into shards (see the module doc), and the inputs that could not be
    read."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    files: dict[str, Item] = {}  # insertion-ordered: the first mention of a file decides its place
    tars: dict[str, None] = {}
    for found in expand_inputs(inputs):
        if found.is_tar:
            tars.setdefault(found.path)
        else:
            files.setdefault(found.path, Item(found.path, found.path))
    loose = list(files.values())
    shards = [
        Shard(i, "files", tuple(loose[s : s + shard_size])) for i, s in enumerate(range(0, len(loose), shard_size))
    ]
    problems = []
    for tar in tars:
        try:
            items = index_tar(tar)
        except (OSError, tarfile.TarError) as e:
            problems.append(InputProblem(tar, f"unreadable tar ({type(e).__name__}: {e})"))
            continue
        if items:
            shards.append(Shard(len(shards), tar, tuple(items)))
    return shards, problems


def index_tar(tar_path: str) -> list[Item]:
    """The image samples of an uncompressed webdataset tar, in stored order, with their data offsets."""
    return [Item(f"{tar_path}:{s.key}", tar_path, s.offset, s.size) for s in index_tar_samples(tar_path)]


# -- the plan on disk: one Parquet row group a shard, so a worker reads only the shard it needs ------------------
def write_plan(shards: Sequence[Shard], path: Path) -> None:
    """Write the plan to ``path`` (atomically: a reader sees a whole plan or none)."""
    # suffix "": the temporary name ends in ".tmp", which the batch runner's clean-up of stale temporaries matches
    with atomic_path(path, suffix="") as tmp, pq.ParquetWriter(tmp, PLAN_SCHEMA) as writer:
        for shard in shards:
            writer.write_table(_shard_table(shard))


def _shard_table(shard: Shard) -> pa.Table:
    return pa.table(
        {
            "shard": pa.array([shard.id] * len(shard.items), pa.int32()),
            "key": [i.key for i in shard.items],
            "path": [i.path for i in shard.items],
            "offset": pa.array([i.offset for i in shard.items], pa.int64()),
            "size": pa.array([i.size for i in shard.items], pa.int64()),
        },
        schema=PLAN_SCHEMA,
    )


def read_plan_shard(path: Path, shard_id: int) -> list[Item]:
    """The samples of one shard of the plan at ``path``."""
    cols = pq.ParquetFile(path).read_row_group(shard_id).to_pydict()
    return [Item(k, p, o, s) for k, p, o, s in zip(cols["key"], cols["path"], cols["offset"], cols["size"])]
