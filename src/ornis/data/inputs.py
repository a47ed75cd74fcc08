"""What the input arguments of a batch command name: folders, images, glob patterns, file lists and tar shards.

- A folder is walked as :mod:`ornis.data.folders` says (recursive, sorted, image extensions only, hidden names
  left out). Files given one by one are taken whatever their extension.
- A glob pattern (``*``, ``?``, ``[``; ``**`` recurses) is expanded in sorted order; each match that is a folder,
  an image or a tar is an input.
- A ``.txt`` / ``.lst`` list has one path a line (blank lines and ``#`` comments skipped); a ``.csv`` or
  ``.parquet`` list has a ``path`` column (or ``file`` / ``filename`` / ``image``; else, for a CSV, the first
  column). Relative paths are relative to the list file's folder.
- A ``.tar`` is a webdataset shard (see :mod:`ornis.data.tar`).
"""

from __future__ import annotations

import csv
import glob
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import pyarrow.parquet as pq

from ornis.data.folders import is_image_name, walk_images
from ornis.data.tar import is_tar_name
from ornis.errors import OrnisError

LIST_SUFFIXES = (".txt", ".lst", ".csv", ".parquet")
PATH_COLUMNS = ("path", "file", "filename", "image")


class InputError(OrnisError):
    """An input argument that names nothing usable (missing path, empty glob, list without a path column)."""


class InputFile(NamedTuple):
    """One file an input argument names: an image, or a webdataset shard (``is_tar``)."""

    path: str
    is_tar: bool = False


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> Iterator[InputFile]:
    """The files the arguments name, in argument order (duplicates kept); ``InputError`` for one that names none."""
    for raw in inputs:
        text = os.fspath(raw)
        path = Path(text)
        if path.is_dir():
            yield from (InputFile(p) for p in walk_images(path))
        elif path.is_file() and is_tar_name(path):
            yield InputFile(text, is_tar=True)
        elif path.is_file() and path.suffix.lower() in LIST_SUFFIXES:
            yield from (InputFile(p) for p in read_file_list(path))
        elif path.is_file():
            yield InputFile(text)
        elif any(c in text for c in "*?["):
            matches = sorted(glob.glob(text, recursive=True))
            if not matches:
                raise InputError(f"{text}: the pattern matches no file")
            yield from expand_inputs(m for m in matches if Path(m).is_dir() or is_image_name(m) or is_tar_name(m))
        else:
            raise InputError(
                f"{text}: no such file or folder (expected a folder, an image, a glob pattern, a .tar shard or a "
                f"{'/'.join(LIST_SUFFIXES)} file list)"
            )


def read_file_list(path: str | os.PathLike) -> list[str]:
    """The paths a ``.txt`` / ``.lst`` / ``.csv`` / ``.parquet`` list names, relative ones resolved against its
    folder."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".txt", ".lst"):
        entries = [e for e in (ln.strip() for ln in path.read_text().splitlines()) if e and not e.startswith("#")]
    elif suffix == ".csv":
        entries = _csv_paths(path)
    else:
        entries = _parquet_paths(path)
    base = path.parent
    return [e if os.path.isabs(e) else os.path.join(base, e) for e in entries]


def _csv_paths(path: Path) -> list[str]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return []
    header = [h.strip().lower() for h in rows[0]]
    column = next((header.index(c) for c in PATH_COLUMNS if c in header), None)
    body = rows[1:] if column is not None else rows  # no known header: every row is a path, in the first column
    column = column or 0
    return [r[column].strip() for r in body if r and r[column].strip()]


def _parquet_paths(path: Path) -> list[str]:
    table = pq.read_table(path)
    names = [n.lower() for n in table.column_names]
    column = next((table.column_names[names.index(c)] for c in PATH_COLUMNS if c in names), None)
    if column is None:
        raise InputError(
            f"{path}: expected a column named one of {', '.join(PATH_COLUMNS)}, found {', '.join(table.column_names)}"
        )
    return [str(v) for v in table.column(column).to_pylist() if v]
