"""Nearest-neighbour search over embeddings (cosine similarity).

Exact search (one matrix product, in chunks) is fast enough and has perfect recall below ``EXACT_LIMIT`` rows; above
it an approximate FAISS index is built (``faiss-cpu``, the ``[index]`` extra): IVF-Flat, whose ``nprobe`` is raised
until recall@10 against exact search, measured at build time on a sample of the rows, reaches ``target_recall``.

An index is a folder: ``index.json`` (kind, size, model, measured recall), ``embeddings.npy`` (the L2-normalised
rows, float32; exact search and the recall check use them), ``paths.json`` and, for approximate kinds,
``faiss.index``. Nothing in it is unpickled.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ornis.data.transforms import classification_transform
from ornis.errors import EmbeddingsFormatError, OrnisError, first_line
from ornis.eval.labels import EmbeddingTable, check_finite
from ornis.eval.metrics import check_positive_int
from ornis.inference.classification import open_rgb
from ornis.loading import load_pretrained_model
from ornis.utils.fs import atomic_path, atomic_write_json
from ornis.weights.checkpoint import get_size_from_signature

log = logging.getLogger("ornis.eval")

IndexKind = Literal["exact", "ivf_flat", "hnsw"]
EXACT_LIMIT = 50_000
DEFAULT_TARGET_RECALL = 0.95
RECALL_SAMPLE = 1000
INDEX_FORMAT_VERSION = 1


def normalize_rows(x: np.ndarray) -> np.ndarray:
    """``x`` (N, D) as float32 with every row scaled to unit L2 norm (all-zero rows stay zero)."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def exact_search(
    database: np.ndarray, queries: np.ndarray, k: int, chunk_size: int = 4096
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` inner products of each query against every database row: (scores, ids), both (Q, k)."""
    db = torch.from_numpy(np.ascontiguousarray(database, dtype=np.float32))
    q = torch.from_numpy(np.ascontiguousarray(queries, dtype=np.float32))
    k = min(k, db.shape[0])
    scores = np.empty((q.shape[0], k), dtype=np.float32)
    ids = np.empty((q.shape[0], k), dtype=np.int64)
    for start in range(0, q.shape[0], chunk_size):
        top = (q[start : start + chunk_size] @ db.T).topk(k, dim=1)
        scores[start : start + chunk_size] = top.values.numpy()
        ids[start : start + chunk_size] = top.indices.numpy()
    return scores, ids


def _faiss() -> Any:
    try:
        import faiss
    except ImportError:
        raise OrnisError(
            "approximate search needs FAISS: pip install 'ornis[index]' (faiss-cpu), or build with kind='exact'"
        ) from None
    return faiss


def recall_at_k(approx_ids: np.ndarray, exact_ids: np.ndarray, k: int = 10) -> float:
    """Mean fraction of each query's exact top-k found in its approximate top-k."""
    hits = [len(set(a[:k]) & set(e[:k])) for a, e in zip(approx_ids.tolist(), exact_ids.tolist())]
    return float(np.mean(hits) / k)


@dataclass
class EmbeddingIndex:
    """L2-normalised embeddings and their paths, searchable by cosine similarity; made by ``build_index``."""

    embeddings: np.ndarray  # (N, D) L2-normalised float32
    paths: list[str]
    kind: IndexKind = "exact"
    model: str | None = None  # what made the embeddings (a weights name or checkpoint path), to embed query images
    recall_at_10: float | None = None  # measured at build time against exact search; None for exact indexes
    params: dict[str, Any] = field(default_factory=dict)  # nlist / nprobe / M / efSearch
    faiss_index: Any = None

    def __len__(self) -> int:
        return self.embeddings.shape[0]

    @property
    def dim(self) -> int:
        """The embedding dimension D."""
        return self.embeddings.shape[1]

    def search(self, queries: np.ndarray, k: int = 10, *, normalized: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Cosine similarities and row ids of each query's ``k`` nearest rows, (Q, k) each, most similar first."""
        check_positive_int("k", k)
        queries = np.atleast_2d(np.asarray(queries, dtype=np.float32))
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise EmbeddingsFormatError(f"queries have {queries.shape[-1]} dimensions, the index has {self.dim}")
        bad = int((~np.isfinite(queries).all(axis=1)).sum())
        if bad:
            raise EmbeddingsFormatError(f"{bad} of {len(queries)} queries have non-finite embeddings (NaN or Inf)")
        if not normalized:
            queries = normalize_rows(queries)
        k = min(k, len(self))
        if self.kind == "exact":
            return exact_search(self.embeddings, queries, k)
        scores, ids = self.faiss_index.search(np.ascontiguousarray(queries), k)
        return scores, ids

    def row_of(self, path: str) -> int:
        """The row of an indexed path (exact string, else the only row whose path ends with it)."""
        matches = self._rows_matching(path)
        if len(matches) == 1:
            return matches[0]
        raise EmbeddingsFormatError(f"{path!r} is not a single indexed path: {_none_or_many(matches)}")

    def _rows_matching(self, path: str) -> list[int]:
        if not hasattr(self, "_rows"):
            self._rows = {p: i for i, p in enumerate(self.paths)}
        if path in self._rows:
            return [self._rows[path]]
        return [i for i, p in enumerate(self.paths) if p.endswith((os.sep + path, "/" + path))]

    # -- files ---------------------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the index files into ``folder`` (created if needed; ``index.json`` last) and return it."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(folder / "embeddings.npy") as tmp:
            np.save(tmp, self.embeddings)
        atomic_write_json(folder / "paths.json", self.paths, indent=None)
        if self.faiss_index is not None:
            with atomic_path(folder / "faiss.index") as tmp:
                _faiss().write_index(self.faiss_index, str(tmp))
        meta = {
            "format_version": INDEX_FORMAT_VERSION,
            "kind": self.kind,
            "count": len(self),
            "dim": self.dim,
            "metric": "cosine",
            "model": self.model,
            "recall_at_10": self.recall_at_10,
            "params": self.params,
        }
        atomic_write_json(folder / "index.json", meta, indent=2)  # last: a folder with index.json is complete
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> EmbeddingIndex:
        """Read an index ``save`` wrote; ``EmbeddingsFormatError`` if ``folder`` is not one or its files disagree.

        Approximate kinds need FAISS (``OrnisError`` without it).
        """
        folder = Path(folder)
        meta_path = folder / "index.json"
        if not meta_path.is_file():
            raise EmbeddingsFormatError(
                f"{folder}: not an index folder (no index.json; build one with `ornis index build`)"
            )
        try:
            meta = json.loads(meta_path.read_text())
            embeddings = np.load(folder / "embeddings.npy", allow_pickle=False)
            paths = json.loads((folder / "paths.json").read_text())
            shape = (meta["count"], meta["dim"], meta["kind"], meta["params"])[:2]
        except (ValueError, KeyError, TypeError, EOFError) as e:  # bad JSON, a pickled or truncated array, a lost key
            raise EmbeddingsFormatError(f"{folder}: a damaged index ({type(e).__name__}: {first_line(e)})") from None
        if embeddings.shape != shape or len(paths) != meta["count"]:
            raise EmbeddingsFormatError(
                f"{folder}: index.json says {meta['count']} x {meta['dim']}, found embeddings {embeddings.shape} and "
                f"{len(paths)} paths"
            )
        bad = int((~np.isfinite(embeddings).all(axis=1)).sum())
        if bad:  # an index built before non-finite rows were refused: they would rank first in every search
            raise EmbeddingsFormatError(
                f"{folder}: {bad} of {len(paths)} rows have non-finite embeddings (NaN or Inf); build the index again "
                "(`ornis index build --drop-non-finite` leaves them out)"
            )
        faiss_index = None
        if meta["kind"] != "exact":
            faiss_index = _faiss().read_index(str(folder / "faiss.index"))
            _apply_search_params(faiss_index, meta["kind"], meta["params"])
        return cls(
            embeddings, paths, meta["kind"], meta.get("model"), meta.get("recall_at_10"), meta["params"], faiss_index
        )


def _none_or_many(matches: list[int]) -> str:
    return f"{len(matches)} rows end with it" if matches else "no row has it"


def _apply_search_params(index: Any, kind: str, params: dict[str, Any]) -> None:
    if kind == "ivf_flat":
        index.nprobe = int(params["nprobe"])
    elif kind == "hnsw":
        index.hnsw.efSearch = int(params["ef_search"])


def choose_kind(count: int) -> IndexKind:
    """The kind ``kind="auto"`` picks for ``count`` rows: exact below ``EXACT_LIMIT``, else IVF-Flat."""
    return "exact" if count < EXACT_LIMIT else "ivf_flat"


def build_index(
    embeddings: np.ndarray,
    paths: list[str] | None = None,
    *,
    kind: IndexKind | Literal["auto"] = "auto",
    model: str | None = None,
    target_recall: float = DEFAULT_TARGET_RECALL,
    recall_sample: int = RECALL_SAMPLE,
    seed: int = 0,
    drop_non_finite: bool = False,
) -> EmbeddingIndex:
    """An index over ``embeddings`` (N, D). ``kind="auto"``: exact below ``EXACT_LIMIT`` rows, else IVF-Flat.

    For approximate kinds the search breadth (IVF ``nprobe``, HNSW ``efSearch``) is doubled until recall@10
    against exact search on ``recall_sample`` rows reaches ``target_recall``; the recall reached is recorded.
    Rows holding NaN or Inf are an ``EmbeddingsFormatError`` with their count, or left out (with their paths) when
    ``drop_non_finite=True``; the index's ``params`` then record ``dropped_non_finite``.
    """
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    check_positive_int("recall_sample", recall_sample)
    raw = np.asarray(embeddings, dtype=np.float32)
    if raw.ndim != 2 or raw.shape[0] == 0:
        raise EmbeddingsFormatError(f"expected a non-empty (N, D) array of embeddings, found shape {raw.shape}")
    paths = list(paths) if paths is not None else [str(i) for i in range(len(raw))]
    if len(paths) != len(raw):
        raise EmbeddingsFormatError(f"{len(paths)} paths for {len(raw)} embeddings")
    table = check_finite(EmbeddingTable(paths, raw), drop_non_finite)
    x, paths = normalize_rows(table.embeddings), table.paths
    dropped = {"dropped_non_finite": table.dropped_non_finite} if table.dropped_non_finite else {}
    if kind == "auto":
        kind = choose_kind(len(x))
    if kind == "exact":
        return EmbeddingIndex(x, paths, "exact", model, params=dropped)
    faiss = _faiss()
    d = x.shape[1]
    if kind == "ivf_flat":
        # ~sqrt(N) lists: k-means training stays cheap and each list holds ~sqrt(N) rows
        nlist = max(1, min(int(4 * math.sqrt(len(x))), len(x) // 39))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = seed
        index.train(x)
        index.add(x)
        params: dict[str, Any] = {"nlist": nlist}
        breadth_key, breadths = "nprobe", _doubling(1, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = 80
        index.add(x)
        params = {"M": 32}
        breadth_key, breadths = "ef_search", _doubling(16, 4096)
    else:
        raise ValueError(f"index kind must be 'auto', 'exact', 'ivf_flat' or 'hnsw', got {kind!r}")

    rng = np.random.default_rng(seed)
    sample = rng.choice(len(x), size=min(recall_sample, len(x)), replace=False)
    _, exact_ids = exact_search(x, x[sample], 11)
    exact_ids = _drop_self(exact_ids, sample, 10)
    recall = 0.0
    for breadth in breadths:
        params[breadth_key] = breadth
        _apply_search_params(index, kind, params)
        _, approx_ids = index.search(x[sample], 11)
        recall = recall_at_k(_drop_self(approx_ids, sample, 10), exact_ids, 10)
        if recall >= target_recall:
            break
    log.info(
        "%s index over %d rows: recall@10 %.4f against exact search (%s=%d)",
        kind,
        len(x),
        recall,
        breadth_key,
        params[breadth_key],
    )
    return EmbeddingIndex(x, paths, kind, model, recall, {**params, **dropped}, index)


def _doubling(start: int, stop: int) -> list[int]:
    out = []
    b = start
    while b < stop:
        out.append(b)
        b *= 2
    return out + [stop]


def _drop_self(ids: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` neighbours other than the query row itself (queries drawn from the database)."""
    out = np.full((ids.shape[0], k), -1, dtype=np.int64)
    for r, (row, own) in enumerate(zip(ids.tolist(), self_ids.tolist())):
        kept = [i for i in row if i != own][:k]
        out[r, : len(kept)] = kept
    return out


@dataclass(frozen=True)
class DuplicatePair:
    """Two index rows (``a < b``) and their cosine similarity."""

    a: int
    b: int
    similarity: float


def near_duplicates(index: EmbeddingIndex, threshold: float = 0.95, neighbours: int = 10) -> list[DuplicatePair]:
    """Pairs of rows whose cosine similarity is at least ``threshold``, most similar first (each pair once).

    Each row's ``neighbours`` nearest rows are checked, so a row with more near-copies than that reports only its
    closest ones (a cluster of copies still shows up as pairs).
    """
    if not -1.0 <= threshold <= 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be a cosine similarity in [-1, 1], got {threshold}")
    check_positive_int("neighbours", neighbours)
    found: dict[tuple[int, int], float] = {}
    chunk = 4096
    for start in range(0, len(index), chunk):
        rows = np.arange(start, min(start + chunk, len(index)))
        scores, ids = index.search(index.embeddings[rows], neighbours + 1, normalized=True)
        for r, row_scores, row_ids in zip(rows.tolist(), scores, ids):
            for s, j in zip(row_scores.tolist(), row_ids.tolist()):
                if j < 0 or j == r or s < threshold:
                    continue
                found[(min(r, j), max(r, j))] = max(s, found.get((min(r, j), max(r, j)), -1.0))
    pairs = [DuplicatePair(a, b, s) for (a, b), s in found.items()]
    return sorted(pairs, key=lambda p: (-p.similarity, p.a, p.b))


def embed_images(paths: list[str], model: str, batch_size: int = 32) -> np.ndarray:
    """Embeddings of image files with ``model`` (a weights name or checkpoint path), preprocessed as ``ornis embed``
    does (the checkpoint's ``classification_transform``), so they are comparable with an index built from it."""
    net, info = load_pretrained_model(model, inference=True)
    transform = classification_transform(get_size_from_signature(info.signature), info.rgb_stats)
    out = []
    with torch.inference_mode():
        for start in range(0, len(paths), batch_size):
            batch = torch.stack([transform(open_rgb(p)) for p in paths[start : start + batch_size]])
            out.append(net.embedding(batch).float().numpy())
    return np.concatenate(out) if out else np.zeros((0, net.embedding_size), np.float32)


def resolve_queries(
    index: EmbeddingIndex, queries: list[str], model: str | None = None
) -> tuple[np.ndarray, list[int | None]]:
    """Query embeddings for a list of row ids, indexed paths or image files, and the index row each one is (None
    for outside images). Image files are embedded with ``model``, by default the model that made the index."""
    rows: list[int | None] = []
    vectors: list[np.ndarray | None] = []
    to_embed: list[tuple[int, str]] = []
    for q in queries:
        if q.isdigit():
            row = int(q)
            if row >= len(index):
                raise EmbeddingsFormatError(f"row {row} is out of range: the index has {len(index)} rows")
        elif q in index.paths or not Path(q).is_file():
            matches = index._rows_matching(q)
            if len(matches) != 1:
                kind = "a folder, not an image file," if Path(q).is_dir() else "not an image file,"
                raise EmbeddingsFormatError(
                    f"query {q!r} is {kind} a row id (0 to {len(index) - 1}) or a single indexed path "
                    f"({_none_or_many(matches)})"
                )
            row = matches[0]
        else:
            row = None
        rows.append(row)
        if row is None:
            to_embed.append((len(vectors), q))
            vectors.append(None)
        else:
            vectors.append(index.embeddings[row])
    if to_embed:
        model = model or index.model
        if not model:
            raise EmbeddingsFormatError("query images need a model to embed them: the index records none; pass model=")
        embedded = embed_images([q for _, q in to_embed], model)
        for (slot, _), vector in zip(to_embed, normalize_rows(embedded)):
            vectors[slot] = vector
    return np.stack(vectors).astype(np.float32), rows
