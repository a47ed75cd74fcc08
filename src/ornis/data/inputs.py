"""What the input arguments of a batch command name: folders, images, glob patterns, file lists and tar shards.

- A folder is walked as :mod:`ornis.data.folders` says (recursive, sorted, image extensions only, hidden names
  left out); a sub-folder that cannot be listed is reported, not skipped in silence. Files given one by one are
  taken whatever their extension (a FIFO or a device given so is taken too, and refused unread by the decoder).
- A glob pattern (``*``, ``?``, ``[``; ``**`` recurses) is expanded in sorted order; each match that is a folder,
  an image or a tar is an input.
- A ``.txt`` / ``.lst`` list has one path a line (blank lines and ``#`` comments skipped); a ``.csv`` or
  ``.parquet`` list has a ``path`` column (or ``file`` / ``filename`` / ``image``). A CSV without such a header is
  refused, naming its columns, unless it has a single column whose first cell is an image name (a header-less
  list). Relative paths are relative to the list file's folder.
- A ``.tar`` is a webdataset shard (see :mod:`ornis.data.tar`).
- A URL (``s3://bucket/photos/``, ``gs://...``; see :mod:`ornis.utils.storage`) names a folder (every object under
  the prefix, by the same rules, in the same order), a pattern, an image, a list or a tar in object storage. A list
  may name URLs; its relative entries are under the list's own folder, wherever that is.

File names are ``str`` as ``os.fsdecode`` makes them: bytes that are not UTF-8 (old archives) are kept as surrogate
escapes, so every name still opens the file it came from (``utf8_name`` is its printable, valid UTF-8 form).
"""

from __future__ import annotations

import csv
import glob
import io
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq

from ornis.data.folders import is_image_name, walk_images, walk_remote_images
from ornis.data.tar import is_tar_name
from ornis.errors import OrnisError, first_line
from ornis.utils.storage import Location, RemotePath, is_remote, join_name, location, read_bytes, storage_errors

LIST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")
PATH_COLUMNS = ("path", "file", "filename", "image")


class InputError(OrnisError):
    """An input argument that names nothing usable (missing path, empty glob, list without a path column)."""


class InputFile(NamedTuple):
    """One file an input argument names: an image, or a webdataset shard (``is_tar``); or, with ``problem``, a
    place that could not be read (a folder that cannot be listed) and why."""

    path: str
    is_tar: bool = False
    problem: str | None = None


def utf8_name(name: str) -> str:
    """``name`` as valid UTF-8 text: each byte that is not UTF-8 (a surrogate escape of ``os.fsdecode``) written as
    ``\\xNN``, as ``ls -b`` shows it. Names that are valid UTF-8 come back unchanged."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return name


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> Iterator[InputFile]:
    """The files the arguments name, in argument order (duplicates kept); ``InputError`` for one that names none."""
    for raw in inputs:
        text = os.fspath(raw)
        if is_remote(text):
            yield from _expand_remote(RemotePath(text), text)
            continue
        path = Path(text)
        if path.is_dir():
            unlisted: list[OSError] = []
            yield from (InputFile(p) for p in walk_images(path, onerror=unlisted.append))
            for e in unlisted:
                yield InputFile(os.fspath(e.filename or text), problem=f"cannot list folder ({e.strerror or e})")
        elif path.is_file() and is_tar_name(path):
            yield InputFile(text, is_tar=True)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            yield from (InputFile(p) for p in read_file_list(path))
        elif path.is_file() or (os.path.lexists(text) and not any(c in text for c in "*?[")):
            yield InputFile(text)  # a special file or a dangling link: the decoder lists it with its reason
        elif any(c in text for c in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise InputError(f"{text}: the pattern matches no file")
            yield from expand_inputs(m for m in matches if Path(m).is_dir() or is_image_name(m) or is_tar_name(m))
        else:
            raise _missing(text)


def _missing(text: str) -> InputError:
    return InputError(
        f"{text}: no such file or folder (expected a folder, an image, a glob pattern, a .tar shard or a "
        f"{'/'.join(LIST_SUFFIXES)} file list)"
    )


def _expand_remote(where: RemotePath, text: str) -> Iterator[InputFile]:
    """``expand_inputs`` for one URL: the same kinds of input, asked of the store."""
    suffix = os.path.splitext(where.name)[1].lower()
    if any(c in text for c in "*?["):
        fs, pattern = where.fs_path()
        with storage_errors(where):
            matches = sorted(fs.unstrip_protocol(m) for m in fs.glob(pattern))
        if not matches:
            raise InputError(f"{text}: the pattern matches no file")
        kept = [m for m in matches if is_image_name(m) or is_tar_name(m) or RemotePath(m).is_dir()]
        yield from expand_inputs(kept)
    elif where.is_file():
        if is_tar_name(text):
            yield InputFile(text, is_tar=True)
        elif suffix in LIST_SUFFIXES:
            yield from (InputFile(p) for p in read_file_list(text))
        else:
            yield InputFile(text)
    elif where.is_dir():
        yield from (InputFile(p) for p in walk_remote_images(where))
    else:
        raise _missing(text)


def read_file_list(path: str | os.PathLike) -> list[str]:
    """The paths a ``.txt`` / ``.lst`` / ``.csv`` / ``.parquet`` list names, relative ones resolved against its
    folder; ``InputError`` naming the list for one that cannot be read or has no path column."""
    where: Location = location(path)
    suffix = os.path.splitext(where.name)[1].lower()
    try:
        data = read_bytes(where)
        if suffix in (".txt", ".lst"):
            lines = data.decode("utf-8", errors="surrogateescape").splitlines()
            entries = [e for e in (ln.strip() for ln in lines) if e and not e.startswith("#")]
        elif suffix == ".csv":
            entries = _csv_paths(where, data)
        else:
            entries = _parquet_paths(where, data)
    except (OSError, csv.Error) as e:
        raise InputError(f"{where}: cannot read the file list ({first_line(e)})") from None
    base = str(where.parent)
    return [join_name(base, e) for e in entries]


def _csv_paths(path: Location, data: bytes) -> list[str]:
    with io.StringIO(data.decode("utf-8", errors="surrogateescape"), newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    column = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    if column is not None:
        body = rows[1:]
    elif len(header) == 1 and is_image_name(header[0]):
        body, column = rows, 0  # a header-less list of paths, one a line
    else:
        raise InputError(
            f"{path}: expected a column named one of {', '.join(PATH_COLUMNS)} in the first row, found "
            f"{', '.join(repr(h) for h in rows[0]) or 'none'}"
        )
    return [r[column].strip() for r in body if len(r) > column and r[column].strip()]


def _parquet_paths(path: Location, data: bytes) -> list[str]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid and friends for a file that is not Parquet
        raise InputError(f"{path}: not a Parquet file list ({first_line(e)})") from None
    names = [n.lower() for n in table.column_names]
    column = next((table.column_names[names.index(c)] for c in PATH_COLUMNS if c in names), None)
    if column is None:
        raise InputError(
            f"{path}: expected a column named one of {', '.join(PATH_COLUMNS)}, found {', '.join(table.column_names)}"
        )
    return [str(v) for v in table.column(column).to_pylist() if v]
