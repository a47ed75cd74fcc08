"""``ornis index build / search / duplicates``: nearest-neighbour search over embeddings (``ornis.eval.index``)."""

from __future__ import annotations

import argparse
import csv
from typing import Any

from ornis.cli.common import (
    add_output_argument,
    check_writable,
    cosine,
    default_arg,
    non_negative_int,
    positive_float,
    positive_int,
)
from ornis.eval.index import EmbeddingIndex, build_index, near_duplicates, resolve_queries
from ornis.eval.labels import read_embeddings
from ornis.utils.fs import atomic_path


def register(subparsers: Any) -> None:
    """Add ``ornis index build / search / duplicates``."""
    p = subparsers.add_parser("index", help="nearest-neighbour search over embeddings (exact, or FAISS for large sets)")
    sub = p.add_subparsers(dest="index_command", metavar="ACTION", required=True)

    b = sub.add_parser(
        "build",
        help="build an index from the Parquet `ornis embed` wrote",
        description="Exact search below 50,000 rows, a FAISS IVF-Flat index above (recall@10 against "
        "exact search is measured at build time and printed).",
    )
    b.add_argument("embeddings", metavar="EMBEDDINGS", help="Parquet file or folder from `ornis embed`")
    add_output_argument(b, "index folder to write", metavar="INDEX", aliases=("--out",))
    b.add_argument("--kind", default=default_arg(build_index, "kind"), choices=["auto", "exact", "ivf_flat", "hnsw"])
    recall = default_arg(build_index, "target_recall")
    b.add_argument(
        "--target-recall",
        type=_recall,
        default=recall,
        help=f"recall@10 the search breadth is tuned to reach (default {recall})",
    )
    b.add_argument("--model", help="model that made the embeddings (default: the Parquet's ornis.model metadata)")
    b.add_argument(
        "--drop-non-finite",
        action="store_true",
        help="leave out rows whose embedding holds NaN or Inf, and say how many (default: refuse the file)",
    )
    b.set_defaults(func=run_build)

    s = sub.add_parser("search", help="nearest rows of query images, row ids or indexed paths")
    s.add_argument("index", metavar="INDEX")
    s.add_argument(
        "queries",
        nargs="+",
        metavar="QUERY",
        help="an image file (embedded with the index's model), a row id or an indexed path",
    )
    s.add_argument("-k", type=positive_int, default=10, help="neighbours to show (default 10)")
    s.add_argument("--model", help="embed query images with this model instead of the index's")
    s.set_defaults(func=run_search)

    d = sub.add_parser("duplicates", help="near-duplicate report: pairs above a cosine similarity")
    d.add_argument("index", metavar="INDEX")
    threshold = default_arg(near_duplicates, "threshold")
    d.add_argument(
        "--threshold", type=cosine, default=threshold, help=f"cosine similarity in [-1, 1] (default {threshold})"
    )
    d.add_argument("--limit", type=non_negative_int, default=50, help="pairs to print (default 50; all go to --csv)")
    d.add_argument("--csv", metavar="FILE", help="write every pair as CSV (path_a, path_b, similarity)")
    d.set_defaults(func=run_duplicates)


def _recall(text: str) -> float:
    """argparse type: a recall in (0, 1]."""
    value = positive_float(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"{text} must be at most 1")
    return value


def run_build(args: argparse.Namespace) -> int:
    """Build and save an index; print its kind, size and measured recall."""
    check_writable(args.output, folder=True)
    table = read_embeddings(args.embeddings, labelled=False, drop_non_finite=args.drop_non_finite)
    index = build_index(
        table.embeddings, table.paths, kind=args.kind, model=args.model or table.model, target_recall=args.target_recall
    )
    index.save(args.output)
    recall = "1.0 (exact)" if index.recall_at_10 is None else f"{index.recall_at_10:.4f} against exact search"
    params = " ".join(f"{k}={v}" for k, v in index.params.items())
    if table.dropped_non_finite:
        params = f"{params} (left out {table.dropped_non_finite} rows with NaN or Inf)".strip()
    print(f"{args.output}: {index.kind} index of {len(index)} x {index.dim}, recall@10 {recall} {params}".rstrip())
    return 0


def run_search(args: argparse.Namespace) -> int:
    """Print the nearest rows of each query."""
    index = EmbeddingIndex.load(args.index)
    vectors, rows = resolve_queries(index, args.queries, args.model)
    scores, ids = index.search(vectors, args.k + 1, normalized=True)
    for query, row, row_scores, row_ids in zip(args.queries, rows, scores, ids):
        print(f"{query}" + (f" (row {row})" if row is not None else ""))
        shown = [(s, j) for s, j in zip(row_scores.tolist(), row_ids.tolist()) if j >= 0 and j != row][: args.k]
        for rank, (s, j) in enumerate(shown, 1):
            print(f"  {rank:>3}  {s:.4f}  {index.paths[j]}")
    return 0


def run_duplicates(args: argparse.Namespace) -> int:
    """Print (and optionally write as CSV) the pairs above the similarity threshold."""
    if args.csv:
        check_writable(args.csv)
    index = EmbeddingIndex.load(args.index)
    pairs = near_duplicates(index, args.threshold)
    print(f"{len(pairs)} pair(s) with cosine similarity >= {args.threshold} among {len(index)} rows")
    for p in pairs[: args.limit]:
        print(f"  {p.similarity:.4f}  {index.paths[p.a]}  {index.paths[p.b]}")
    if args.csv:
        with atomic_path(args.csv) as tmp, open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["path_a", "path_b", "similarity"])
            w.writerows((index.paths[p.a], index.paths[p.b], f"{p.similarity:.6f}") for p in pairs)
    return 0
