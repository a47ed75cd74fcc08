"""The plan of a batch run: every input expanded into samples and cut into shards, deterministically (same inputs
and files, same shards), and kept on disk so that every worker, rank and resumed run reads the same plan.

Loose files (folders, images, globs, file lists; see :mod:`ornis.data.inputs`) are cut into shards of
``shard_size`` in input order, each file once (two spellings of one path, ``data/a.jpg`` and ``./data//a.jpg``, are
one file; the first spelling names it); each tar is one shard of its own, its samples named ``<tar path>:<key>``
(see :mod:`ornis.data.tar`). A tar that cannot be read, one cut short, or a folder that cannot be listed is not an
error of the run: it becomes an ``InputProblem`` for the errors file. Inputs that hold no image at all are an
``InputError``.

Names are kept as bytes in the plan file (``os.fsencode``), so a file name that is not UTF-8 survives the round
trip and still opens its file. The plan file may live in object storage (``write_plan`` / ``read_plan_shard`` take a
``Path`` or a ``RemotePath``): it is written whole, and a worker reads only its shard's row group by ranged reads.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ornis.data.decode import IMAGE_EXTENSIONS
from ornis.data.inputs import LIST_SUFFIXES, InputError, expand_inputs
from ornis.data.tar import TarIndex, scan_tar
from ornis.utils.storage import Location, committed, is_remote, location, open_input, same_place

REMOTE_SCANS = 16  # tars in object storage indexed at once (each scan mostly waits for its ranged reads)
PLAN_BLOCK = 1 << 20  # bytes read ahead from a plan in object storage: a shard's row group in one request

PLAN_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("key", pa.binary()), ("path", pa.binary()), ("offset", pa.int64()), ("size", pa.int64())]
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
    read. ``InputError`` when the inputs hold no image and nothing unreadable either."""
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive integer, got {shard_size!r}")
    files: dict[str, Item] = {}  # insertion-ordered: the first mention of a file decides its place
    tars: dict[str, str] = {}
    problems = []
    for found in expand_inputs(inputs):
        same = same_place(found.path) if is_remote(found.path) else os.path.abspath(found.path)  # however spelt
        if found.problem is not None:
            problems.append(InputProblem(found.path, found.problem))
        elif found.is_tar:
            tars.setdefault(same, found.path)
        else:
            files.setdefault(same, Item(found.path, found.path))
    loose = list(files.values())
    shards = [
        Shard(i, "files", tuple(loose[s : s + shard_size])) for i, s in enumerate(range(0, len(loose), shard_size))
    ]
    for tar, index in zip(tars.values(), _scan_all(list(tars.values()))):
        if isinstance(index, Exception):
            problems.append(InputProblem(tar, f"unreadable tar ({type(index).__name__}: {index})"))
            continue
        if index.problem is not None:
            problems.append(InputProblem(tar, index.problem))
        if index.samples:
            items = [Item(f"{tar}:{s.key}", tar, s.offset, s.size) for s in index.samples]
            shards.append(Shard(len(shards), tar, tuple(items)))
    if not shards and not problems:
        raise InputError(
            f"no images found in {', '.join(os.fspath(i) for i in inputs)} (images are files ending in "
            f"{', '.join(sorted(IMAGE_EXTENSIONS)[:6])}, ...; or .tar shards, or {'/'.join(LIST_SUFFIXES)} lists)"
        )
    return shards, problems


def _scan_all(tars: list[str]) -> list[TarIndex | Exception]:
    """Each tar's index, or why it could not be read; tars in object storage are scanned several at once."""

    def scan(tar: str) -> TarIndex | Exception:
        try:
            return scan_tar(tar)
        except (OSError, tarfile.TarError) as e:
            return e

    if not any(is_remote(t) for t in tars):
        return [scan(t) for t in tars]
    with ThreadPoolExecutor(REMOTE_SCANS) as pool:
        return list(pool.map(scan, tars))


def index_tar(tar_path: str) -> list[Item]:
    """The image samples of an uncompressed webdataset tar, in stored order, with their data offsets."""
    return [Item(f"{tar_path}:{s.key}", tar_path, s.offset, s.size) for s in scan_tar(tar_path).samples]


# -- the plan on disk: one Parquet row group a shard, so a worker reads only the shard it needs ------------------
def write_plan(shards: Sequence[Shard], path: Location | str) -> None:
    """Write the plan to ``path`` (atomically: a reader sees a whole plan or none)."""
    # suffix "": the temporary name ends in ".tmp", which the batch runner's clean-up of stale temporaries matches
    with committed(location(path), suffix="") as tmp, pq.ParquetWriter(tmp, PLAN_SCHEMA) as writer:
        for shard in shards:
            writer.write_table(_shard_table(shard))


def _shard_table(shard: Shard) -> pa.Table:
    return pa.table(
        {
            "shard": pa.array([shard.id] * len(shard.items), pa.int32()),
            "key": [os.fsencode(i.key) for i in shard.items],
            "path": [os.fsencode(i.path) for i in shard.items],
            "offset": pa.array([i.offset for i in shard.items], pa.int64()),
            "size": pa.array([i.size for i in shard.items], pa.int64()),
        },
        schema=PLAN_SCHEMA,
    )


def read_plan_shard(path: Location | str, shard_id: int) -> list[Item]:
    """The samples of one shard of the plan at ``path``."""
    where = location(path)
    if is_remote(where):
        with open_input(where, PLAN_BLOCK) as f:
            cols = pq.ParquetFile(f).read_row_group(shard_id).to_pydict()
    else:
        cols = pq.ParquetFile(where).read_row_group(shard_id).to_pydict()
    keys, paths = (_names(cols[c]) for c in ("key", "path"))
    return [Item(k, p, o, s) for k, p, o, s in zip(keys, paths, cols["offset"], cols["size"])]


def _names(values: list[bytes | str]) -> list[str]:
    # bytes since names may not be UTF-8; plans written before that hold str
    return [os.fsdecode(v) for v in values]
