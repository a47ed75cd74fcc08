"""Embeddings tables as ``ornis embed`` writes them (Parquet: one row an image, ``path`` and ``embedding``), with
labels taken from a column or from the name of each image's parent folder (the folder-per-class layout)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ornis.errors import EmbeddingsFormatError

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

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: np.ndarray) -> EmbeddingTable:
        """A new table of the given rows (an index array), with the same class names and model."""
        labels = None if self.labels is None else self.labels[rows]
        return EmbeddingTable(
            [self.paths[i] for i in rows], self.embeddings[rows], labels, self.class_names, self.model
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
) -> EmbeddingTable:
    """Read a Parquet file (or a folder of Parquet shards) written by ``ornis embed``.

    Labels come from ``label_column`` when given (strings or integers), else from each path's parent folder name.
    ``class_names`` fixes the label order (e.g. a training set's, so a validation file maps the same way); by
    default the sorted distinct names. ``labelled=False`` skips labels altogether.
    """
    source = Path(source)
    if not source.exists():
        raise EmbeddingsFormatError(f"{source}: no such embeddings file or folder")
    table = pq.read_table(source)
    for needed in (PATH_COLUMN, EMBEDDING_COLUMN):
        if needed not in table.column_names:
            raise EmbeddingsFormatError(
                f"{source}: expected a {needed!r} column (as `ornis embed` writes), "
                f"found {', '.join(table.column_names)}"
            )
    paths = [str(p) for p in table.column(PATH_COLUMN).to_pylist()]
    embeddings = embeddings_from_column(table.column(EMBEDDING_COLUMN), source)
    model = _metadata(source, table).get("ornis.model")
    if not labelled:
        return EmbeddingTable(paths, embeddings, model=model)
    if label_column is not None:
        if label_column not in table.column_names:
            raise EmbeddingsFormatError(
                f"{source}: no label column {label_column!r}; found {', '.join(table.column_names)}"
            )
        raw = [str(v) for v in table.column(label_column).to_pylist()]
    else:
        raw = [Path(p).parent.name for p in paths]
    labels, names = encode_labels(raw, class_names, source)
    return EmbeddingTable(paths, embeddings, labels, names, model)


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
        raise ValueError(f"held-out fraction must be in (0, 1), got {held_out}")
    rng = np.random.default_rng(seed)
    kept, out = [], []
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_out = min(len(rows) - 1, round(len(rows) * held_out))
        out.append(rows[:n_out])
        kept.append(rows[n_out:])
    return np.sort(np.concatenate(kept)), np.sort(np.concatenate(out))
