"""Inputs for batch work: folders, glob patterns, file lists (txt / CSV / Parquet) and webdataset ``.tar`` shards,
turned into a deterministic list of shards, and a dataset that decodes one sample of one shard.

- A folder is walked recursively in sorted order; files with a common image extension are taken, hidden files and
  folders (``.name``) are left out. Files given one by one are taken whatever their extension.
- A glob pattern (``*``, ``?``, ``[``; ``**`` recurses) is expanded in sorted order; each match is an input.
- A ``.txt`` / ``.lst`` list has one path a line (blank lines and ``#`` comments skipped); a ``.csv`` or
  ``.parquet`` list has a ``path`` column (or ``file`` / ``filename`` / ``image``; else the first column). Relative
  paths are relative to the list file's folder.
- A ``.tar`` is a webdataset shard: members sharing a key (the name up to the first dot of its last part) form one
  sample, and the first image member of each sample is taken. Its rows are named ``<tar path>:<key>``. Tars are read
  with :mod:`tarfile` by offset, so they must be uncompressed (as webdataset writes them).

Loose files are cut into shards of ``shard_size`` in input order; each tar is one shard of its own.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import tarfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from torch.utils.data import Dataset

from ornis.data.decode import IMAGE_EXTENSIONS, DecodeOptions, ImageDecodeError, decode_image
from ornis.errors import OrnisError

LIST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")
PATH_COLUMNS = ("path", "file", "filename", "image")
PLAN_SCHEMA = pa.schema(
    [("shard", pa.int32()), ("key", pa.string()), ("path", pa.string()), ("offset", pa.int64()), ("size", pa.int64())]
)


class InputError(OrnisError):
    """An input argument that names nothing usable (missing path, empty glob, list without a path column)."""


@dataclass(frozen=True)
class Item:
    """One sample: ``key`` is what the output row is called; a tar member also has its data offset and size."""

    key: str
    path: str
    offset: int = -1
    size: int = -1


@dataclass(frozen=True)
class Shard:
    id: int
    source: str  # "files", or the tar's path
    items: tuple[Item, ...]


@dataclass(frozen=True)
class InputProblem:
    """A whole input that could not be read while planning (an unreadable tar); listed in the errors file."""

    key: str
    reason: str


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def plan_shards(inputs: Sequence[str | os.PathLike], shard_size: int = 1000) -> tuple[list[Shard], list[InputProblem]]:
    """Every input expanded into samples, cut into shards. Deterministic: same inputs and files, same shards."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be at least 1, got {shard_size}")
    files: list[Item] = []
    tars: list[str] = []
    seen: set[str] = set()
    for kind, path in _expand(inputs):
        if kind == "tar":
            if path not in tars:
                tars.append(path)
        elif path not in seen:
            seen.add(path)
            files.append(Item(path, path))
    shards = [
        Shard(i, "files", tuple(files[s : s + shard_size])) for i, s in enumerate(range(0, len(files), shard_size))
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


def _expand(inputs: Iterable[str | os.PathLike]) -> Iterable[tuple[str, str]]:
    """(kind, path) pairs, kind "file" or "tar", in input order."""
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            yield from _walk(path)
        elif path.is_file() and path.suffix.lower() == ".tar":
            yield "tar", text
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            for entry in read_file_list(path):
                yield "file", entry
        elif path.is_file():
            yield "file", text
        elif any(c in text for c in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise InputError(f"{text}: the pattern matches no file")
            yield from _expand(m for m in matches if Path(m).is_dir() or is_image_name(m) or m.endswith(".tar"))
        else:
            raise InputError(
                f"{text}: no such file or folder (expected a folder, an image, a glob pattern, a .tar shard or a {'/'.join(LIST_SUFFIXES)} file list)"
            )


def _walk(folder: Path) -> Iterable[tuple[str, str]]:
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(names):
            if not name.startswith(".") and is_image_name(name):
                yield "file", os.path.join(root, name)


def read_file_list(path: Path) -> list[str]:
    """The paths a ``.txt`` / ``.lst`` / ``.csv`` / ``.parquet`` list names, relative ones resolved against its folder."""
    suffix = path.suffix.lower()
    if suffix in (".txt", ".lst"):
        entries = [ln.strip() for ln in path.read_text().splitlines()]
        entries = [e for e in entries if e and not e.startswith("#")]
    elif suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows:
            return []
        header = [h.strip().lower() for h in rows[0]]
        column = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
        body = rows[1:] if column is not None else rows
        entries = [r[column or 0].strip() for r in body if r and r[column or 0].strip()]
    else:
        table = pq.read_table(path)
        names = [n.lower() for n in table.column_names]
        column = next((table.column_names[names.index(c)] for c in PATH_COLUMNS if c in names), None)
        if column is None:
            raise InputError(
                f"{path}: expected a column named one of {', '.join(PATH_COLUMNS)}, found {', '.join(table.column_names)}"
            )
        entries = [str(v) for v in table.column(column).to_pylist() if v]
    base = path.parent
    return [e if os.path.isabs(e) else os.path.join(base, e) for e in entries]


def index_tar(tar_path: str) -> list[Item]:
    """The image samples of an uncompressed webdataset tar, in stored order, with their data offsets."""
    items: list[Item] = []
    seen: set[str] = set()
    with tarfile.open(tar_path, "r:") as tf:
        for member in tf:
            if not member.isfile() or not is_image_name(member.name):
                continue
            folder, base = os.path.split(member.name)
            key = os.path.join(folder, base.split(".", 1)[0])
            if key in seen:  # a second image of the same sample (e.g. a mask): the first one is the sample
                continue
            seen.add(key)
            items.append(Item(f"{tar_path}:{key}", tar_path, member.offset_data, member.size))
    return items


# -- the plan on disk: one Parquet row group a shard, so a worker reads only the shard it needs ------------------
def write_plan(shards: Sequence[Shard], path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with pq.ParquetWriter(tmp, PLAN_SCHEMA) as writer:
        for shard in shards:
            writer.write_table(
                pa.table(
                    {
                        "shard": pa.array([shard.id] * len(shard.items), pa.int32()),
                        "key": [i.key for i in shard.items],
                        "path": [i.path for i in shard.items],
                        "offset": pa.array([i.offset for i in shard.items], pa.int64()),
                        "size": pa.array([i.size for i in shard.items], pa.int64()),
                    },
                    schema=PLAN_SCHEMA,
                )
            )
    os.replace(tmp, path)


def read_plan_shard(path: Path, shard_id: int) -> list[Item]:
    table = pq.ParquetFile(path).read_row_group(shard_id)
    cols = table.to_pydict()
    return [Item(k, p, o, s) for k, p, o, s in zip(cols["key"], cols["path"], cols["offset"], cols["size"])]


class ShardDataset(Dataset):
    """``dataset[(shard, index)]`` decodes one sample and returns a dict; a bad sample is returned as a dict with
    ``ok=False`` and its ``reason``, never raised, so one file cannot end a DataLoader worker or the run.

    ``transform`` runs on the decoded RGB PIL image in the worker (the CPU part of the preprocessing). With
    ``raw_jpeg=True`` a plain (RGB or grayscale) JPEG is not decoded here: its bytes come back as ``jpeg`` (a uint8
    tensor) for batched decoding on the model's device; its header is still checked here (size, bomb limit).
    """

    def __init__(
        self,
        plan_path: Path,
        transform: Callable[[Any], torch.Tensor],
        options: DecodeOptions | None = None,
        raw_jpeg: bool = False,
    ) -> None:
        self.plan_path = Path(plan_path)
        self.transform = transform
        self.options = options or DecodeOptions()
        self.raw_jpeg = raw_jpeg
        self._shards: OrderedDict[int, list[Item]] = OrderedDict()
        self._tar: tuple[str, Any] | None = None

    def items(self, shard_id: int) -> list[Item]:
        if shard_id not in self._shards:
            self._shards[shard_id] = read_plan_shard(self.plan_path, shard_id)
            while len(self._shards) > 4:
                self._shards.popitem(last=False)
        return self._shards[shard_id]

    def __getitem__(self, index: tuple[int, int]) -> dict[str, Any]:
        shard_id, i = index
        item = self.items(shard_id)[i]
        start = time.perf_counter()
        out: dict[str, Any] = {"shard": shard_id, "index": i, "key": item.key}
        try:
            data = self._read_tar_member(item) if item.offset >= 0 else item.path
            if self.raw_jpeg:
                data = _read_bytes(data, item.key)
                size = self._plain_jpeg_size(data)
                if size is not None:
                    jpeg = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    out.update(ok=True, jpeg=jpeg, width=size[0], height=size[1], decode_s=time.perf_counter() - start)
                    return out
            decoded = decode_image(data, self.options, source=item.key)
            pixels = self.transform(decoded.image)
        except ImageDecodeError as e:
            out.update(ok=False, reason=e.reason)
        except Exception as e:  # noqa: BLE001 - a transform failing on one odd image must not end the run either
            out.update(ok=False, reason=f"preprocessing failed ({type(e).__name__}: {e})")
        else:
            out.update(ok=True, pixels=pixels, width=decoded.width, height=decoded.height)
        out["decode_s"] = time.perf_counter() - start
        return out

    def _plain_jpeg_size(self, data: bytes) -> tuple[int, int] | None:
        """(width, height) of a JPEG the device decoder gives the same colours for (RGB or L, within the pixel
        limit, no EXIF transposition asked for); ``None`` sends the file down the CPU path."""
        if not data.startswith(b"\xff\xd8\xff") or self.options.exif_transpose:
            return None
        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only
                if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                    return None
                width, height = image.size
        except Exception:  # noqa: BLE001 - whatever it is, the CPU path will name it
            return None
        return (width, height) if width * height <= self.options.max_pixels else None

    def _read_tar_member(self, item: Item) -> bytes:
        if self._tar is None or self._tar[0] != item.path:
            if self._tar is not None:
                self._tar[1].close()
            self._tar = (item.path, open(item.path, "rb"))  # noqa: SIM115 - kept open across samples, closed on switch
        f = self._tar[1]
        f.seek(item.offset)
        data = f.read(item.size)
        if len(data) != item.size:
            raise ImageDecodeError(item.key, f"truncated tar member ({len(data)} of {item.size} bytes)")
        return data

    def __getstate__(self) -> dict[str, Any]:  # open files and caches stay in the process that made them
        return {**self.__dict__, "_shards": OrderedDict(), "_tar": None}

    def __len__(self) -> int:
        raise TypeError("ShardDataset is indexed by (shard, index) pairs from a sampler; it has no length")


def _read_bytes(data: bytes | str, source: str) -> bytes:
    if isinstance(data, bytes):
        return data
    try:
        with open(data, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ImageDecodeError(source, "file not found") from None
    except OSError as e:
        raise ImageDecodeError(source, f"cannot read file ({e.strerror or e})") from None


def collate_samples(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """A batch: the good samples' pixels stacked, their keys and sizes, and the bad ones as error records. Samples
    left as JPEG bytes (``raw_jpeg``) come after the decoded ones, their bytes in ``jpeg``."""
    decoded = [s for s in samples if s["ok"] and "pixels" in s]
    good = decoded + [s for s in samples if s["ok"] and "jpeg" in s]
    return {
        "pixels": torch.stack([s["pixels"] for s in decoded]) if decoded else None,
        "jpeg": [s["jpeg"] for s in good[len(decoded) :]],
        "shard": [s["shard"] for s in good],
        "index": [s["index"] for s in good],
        "key": [s["key"] for s in good],
        "width": [s["width"] for s in good],
        "height": [s["height"] for s in good],
        "errors": [(s["shard"], s["index"], s["key"], s["reason"]) for s in samples if not s["ok"]],
        "decode_s": sum(s["decode_s"] for s in samples),
        "count": len(samples),
    }
