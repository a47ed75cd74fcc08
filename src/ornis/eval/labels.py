"""Embeddings tables as ``ornis embed`` writes them (Parquet: one row an image, ``path`` and ``embedding``), with
labels taken from a column or from the name of each image's parent folder (the folder-per-class layout)."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ornis.errors import EmbeddingsFormatError, first_line

log = logging.getLogger("ornis.eval")

PATH_COLUMN = "path"
EMBEDDING_COLUMN = "embedding"


@dataclass
class EmbeddingTable:
    """Rows of one embeddings file: ``embeddings`` (N, D) float32, ``paths`` (N,), ``labels`` (N,) int64 indices
    into ``class_names`` (``None`` when unlabelled)."""

    paths: list[str]
    embeddings: np.ndarray
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    model: str | None = None  # the file's ``ornis.model`` metadata: what made the embeddings
    source: str | None = None  # the file or folder the rows were read from, for error messages
    dropped_non_finite: int = 0  # rows left out because their embedding held NaN or Inf (``drop_non_finite``)

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: np.ndarray) -> EmbeddingTable:
        """A new table of the given rows (an index array), with the same class names, model and source."""
        labels = None if self.labels is None else self.labels[rows]
        return EmbeddingTable(
            [self.paths[i] for i in rows],
            self.embeddings[rows],
            labels,
            self.class_names,
            self.model,
            self.source,
            self.dropped_non_finite,
        )

    @property
    def name(self) -> str:
        """What error messages call the table: its source, or "the embeddings"."""
        return self.source or "the embeddings"


def check_finite(table: EmbeddingTable, drop_non_finite: bool = False) -> EmbeddingTable:
    """``table`` if every embedding is finite. Rows holding NaN or Inf make every cosine similarity with them NaN
    (and rank first in a top-k), so they are an ``EmbeddingsFormatError`` with their count, or with
    ``drop_non_finite=True`` left out: the returned table counts them in ``dropped_non_finite``."""
    if table.embeddings.ndim != 2:
        raise EmbeddingsFormatError(f"{table.name}: expected (N, D) embeddings, found shape {table.embeddings.shape}")
    bad = ~np.isfinite(table.embeddings).all(axis=1)
    count = int(bad.sum())
    if not count:
        return table
    example = table.paths[int(np.flatnonzero(bad)[0])]
    if not drop_non_finite:
        raise EmbeddingsFormatError(
            f"{table.name}: {count} of {len(table)} rows have non-finite embeddings (NaN or Inf), e.g. {example!r}; "
            "leave them out with --drop-non-finite (drop_non_finite=True)"
        )
    if count == len(table):
        raise EmbeddingsFormatError(f"{table.name}: all {count} rows have non-finite embeddings (NaN or Inf)")
    kept = table.subset(np.flatnonzero(~bad))
    kept.dropped_non_finite += count
    log.warning("%s: left out %d of %d rows with non-finite embeddings (NaN or Inf)", table.name, count, len(table))
    return kept


def check_classes(table: EmbeddingTable, what: str, minimum: int = 2) -> None:
    """An ``EmbeddingsFormatError`` naming the file unless ``table`` is labelled with at least ``minimum`` classes
    present: ``what`` (e.g. "k-NN evaluation") cannot tell classes apart with fewer."""
    if table.labels is None or table.class_names is None:
        raise EmbeddingsFormatError(f"{table.name}: {what} needs labels")
    present = np.unique(table.labels)
    if len(present) < minimum:
        found = ", ".join(repr(table.class_names[int(i)]) for i in present) or "none"
        raise EmbeddingsFormatError(
            f"{table.name}: {what} needs at least {minimum} classes, found {len(present)} ({found}); labels come from "
            "each image's parent folder (<class>/<image>) or from a column (--label-column)"
        )


def embeddings_from_column(
    column: pa.Array | pa.ChunkedArray, source: str | os.PathLike, name: str = EMBEDDING_COLUMN
) -> np.ndarray:
    """A (fixed-size) list<float> Arrow column as an (N, D) float32 array, without a Python loop."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    if not (
        pa.types.is_fixed_size_list(column.type) or pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    ):
        raise EmbeddingsFormatError(f"{source}: column {name!r} should hold lists of floats, found {column.type}")
    if len(column) == 0:
        return np.zeros((0, getattr(column.type, "list_size", 0)), dtype=np.float32)
    if column.null_count:
        raise EmbeddingsFormatError(f"{source}: column {name!r} has {column.null_count} empty rows (failed images?)")
    flat = column.flatten().to_numpy(zero_copy_only=False).astype(np.float32)  # a writable copy
    if flat.size % len(column):
        raise EmbeddingsFormatError(f"{source}: column {name!r} rows have different lengths")
    return flat.reshape(len(column), -1)


def read_embeddings(
    source: str | os.PathLike,
    *,
    label_column: str | None = None,
    class_names: Sequence[str] | None = None,
    labelled: bool = True,
    drop_non_finite: bool = False,
) -> EmbeddingTable:
    """Read a Parquet file (or a folder of Parquet shards) written by ``ornis embed``.

    Labels come from ``label_column`` when given (strings or integers), else from each path's parent folder name.
    ``class_names`` fixes the label order (e.g. a training set's, so a validation file maps the same way); by
    default the sorted distinct names. ``labelled=False`` skips labels altogether.

    ``EmbeddingsFormatError`` naming the file for: no rows, a missing column, rows without a label (null or empty in
    ``label_column``, or a path without a parent folder), and rows whose embedding holds NaN or Inf unless
    ``drop_non_finite=True`` leaves them out (counted in the table's ``dropped_non_finite``).
    """
    source = Path(source)
    if not source.exists():
        raise EmbeddingsFormatError(f"{source}: no such embeddings file or folder")
    if not (source.is_file() or source.is_dir()):  # pyarrow calls /dev/null or a FIFO "not found"
        raise EmbeddingsFormatError(f"{source}: a special file (device, FIFO or socket), not a Parquet file or folder")
    try:
        table = pq.read_table(source)
    except pa.ArrowException as e:
        raise EmbeddingsFormatError(f"{source}: not a Parquet file or folder of them ({first_line(e)})") from None
    for needed in (PATH_COLUMN, EMBEDDING_COLUMN):
        if needed not in table.column_names:
            raise EmbeddingsFormatError(
                f"{source}: expected a {needed!r} column (as `ornis embed` writes), "
                f"found {', '.join(table.column_names) or 'no columns'}"
            )
    if table.num_rows == 0:
        raise EmbeddingsFormatError(f"{source}: no rows (an empty embeddings file)")
    paths = [str(p) for p in table.column(PATH_COLUMN).to_pylist()]
    embeddings = embeddings_from_column(table.column(EMBEDDING_COLUMN), source)
    model = _metadata(source, table).get("ornis.model")
    labels, names = None, None
    if labelled:
        raw = _raw_labels(table, paths, label_column, source)
        labels, names = encode_labels(raw, class_names, source)
    read = EmbeddingTable(paths, embeddings, labels, names, model, str(source))
    return check_finite(read, drop_non_finite)


def _is_missing(value: object) -> bool:
    return value is None or value == "" or (isinstance(value, float) and math.isnan(value))


def _raw_labels(table: pa.Table, paths: list[str], label_column: str | None, source: Path) -> list[str]:
    """Each row's label name, from ``label_column`` or the parent folder; an error naming the file for rows
    without one (a class called "None" or "" would be silently wrong)."""
    if label_column is not None:
        if label_column not in table.column_names:
            raise EmbeddingsFormatError(
                f"{source}: no label column {label_column!r}; found {', '.join(table.column_names)}"
            )
        values = table.column(label_column).to_pylist()
        missing = [i for i, v in enumerate(values) if _is_missing(v)]
        if missing:
            raise EmbeddingsFormatError(
                f"{source}: {len(missing)} of {len(values)} rows have no label in column {label_column!r} (null or "
                f"empty), e.g. row {missing[0]} ({paths[missing[0]]!r})"
            )
        return [str(v) for v in values]
    raw = [Path(p).parent.name for p in paths]
    missing = [i for i, r in enumerate(raw) if not r]
    if missing:
        raise EmbeddingsFormatError(
            f"{source}: {len(missing)} of {len(raw)} paths have no parent folder to take a class from, e.g. "
            f"{paths[missing[0]]!r}; lay images out as <class>/<image> or name a label column (--label-column)"
        )
    return raw


def _metadata(source: Path, table: pa.Table) -> dict[str, str]:
    """The ``ornis.*`` key-value metadata of the file (of its first part, for a folder of parts)."""
    meta = table.schema.metadata
    if not meta and source.is_dir():
        parts = sorted(source.glob("part-*.parquet"))
        meta = pq.read_schema(parts[0]).metadata if parts else None
    return {k.decode(): v.decode() for k, v in (meta or {}).items() if k.startswith(b"ornis.")}


def encode_labels(
    raw: Sequence[str], class_names: Sequence[str] | None, source: str | os.PathLike | None = None
) -> tuple[np.ndarray, list[str]]:
    """Label names -> (int64 indices into the class names, the class names: ``class_names`` or the sorted distinct
    labels). Raises ``EmbeddingsFormatError`` for a label not among them; ``source`` only names the file."""
    names = list(class_names) if class_names is not None else sorted(set(raw))
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(raw) - index.keys())
    if unknown:
        shown = ", ".join(unknown[:10])
        raise EmbeddingsFormatError(f"{source}: labels not among the {len(names)} known classes: {shown}")
    return np.array([index[r] for r in raw], dtype=np.int64), names


def stratified_split(labels: np.ndarray, held_out: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (kept, held out): about ``held_out`` of each class held out, at least one row kept per class."""
    if not 0.0 < held_out < 1.0:
        raise ValueError(f"held_out must be a fraction in (0, 1), got {held_out}")
    rng = np.random.default_rng(seed)
    kept, out = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_out = min(len(rows) - 1, round(len(rows) * held_out))
        out.append(rows[:n_out])
        kept.append(rows[n_out:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(out))
