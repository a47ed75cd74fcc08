"""Nearest-neighbour search: exact search against brute force, FAISS recall against exact, files, near-duplicates,
and the ``ornis index`` commands."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ornis.errors import EmbeddingsFormatError
from ornis.eval.index import (
    EmbeddingIndex,
    build_index,
    choose_kind,
    exact_search,
    near_duplicates,
    normalize_rows,
    recall_at_k,
)


def clustered(n: int, dim: int, clusters: int, seed: int = 0) -> np.ndarray:
    """Embeddings with structure, as real ones have: points around a few hundred centres."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.5 * rng.normal(size=(n, dim))).astype(np.float32)


def test_exact_search_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    db, q = normalize_rows(rng.normal(size=(300, 16))), normalize_rows(rng.normal(size=(20, 16)))
    scores, ids = exact_search(db, q, 5, chunk_size=7)  # several chunks
    sim = q @ db.T
    want = np.argsort(-sim, axis=1)[:, :5]
    np.testing.assert_array_equal(ids, want)
    np.testing.assert_allclose(scores, np.take_along_axis(sim, want, 1), rtol=1e-5)


def test_kind_is_chosen_by_size() -> None:
    assert choose_kind(49_999) == "exact" and choose_kind(50_000) == "ivf_flat"
    index = build_index(np.ones((10, 4)), kind="auto")
    assert index.kind == "exact" and index.recall_at_10 is None


@pytest.mark.parametrize("kind", ["ivf_flat", "hnsw"])
def test_approximate_index_reaches_its_target_recall(kind: str, tmp_path: Path) -> None:
    pytest.importorskip("faiss")
    data = clustered(6300, 32, 200)
    index = build_index(data[:6000], kind=kind, target_recall=0.95)
    assert index.recall_at_10 >= 0.95
    # Fresh queries from the same distribution, not rows of the index: recall holds beyond the build-time sample
    queries = normalize_rows(data[6000:])
    _, approx = index.search(queries, 10, normalized=True)
    _, exact = exact_search(index.embeddings, queries, 10)
    assert recall_at_k(approx, exact) >= 0.93
    loaded = EmbeddingIndex.load(index.save(tmp_path / "idx"))
    assert loaded.kind == kind and loaded.params == index.params
    np.testing.assert_array_equal(loaded.search(queries, 10, normalized=True)[1], approx)


@pytest.mark.slow
def test_faiss_recall_at_10_on_100k_random_vectors() -> None:
    """Acceptance: recall@10 >= 0.95 against exact search on 100k random vectors (IVF-Flat chosen by size).
    Measured: 0.96 at nprobe 512 of 1264 lists (random vectors have no clusters, so IVF must probe many lists)."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100_000, 64)).astype(np.float32)
    index = build_index(x)
    assert index.kind == "ivf_flat" and len(index) == 100_000
    assert index.recall_at_10 >= 0.95
    queries = normalize_rows(rng.standard_normal((500, 64)))
    _, approx = index.search(queries, 10, normalized=True)
    _, exact = exact_search(index.embeddings, queries, 10)
    assert recall_at_k(approx, exact) >= 0.95


def test_near_duplicates_finds_exactly_the_planted_pairs() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 32)).astype(np.float32)  # random 32-d rows: pairwise cosine well below 0.8
    planted = [(5, 150), (17, 42), (99, 100)]
    for a, b in planted:
        x[b] = x[a] + 0.01 * rng.normal(size=32)
    x[60] = x[5] * 3.0  # a rescaled copy is a duplicate under cosine
    pairs = near_duplicates(build_index(x), threshold=0.9)
    found = {(p.a, p.b) for p in pairs}
    assert found == {(5, 150), (17, 42), (99, 100), (5, 60), (60, 150)}
    assert all(p.similarity > 0.99 for p in pairs)
    assert pairs[0].similarity >= pairs[-1].similarity


def test_index_files_round_trip_and_errors(tmp_path: Path) -> None:
    x = clustered(100, 8, 5)
    index = build_index(x, [f"img/{i}.jpg" for i in range(100)], model="m")
    loaded = EmbeddingIndex.load(index.save(tmp_path / "idx"))
    np.testing.assert_array_equal(loaded.embeddings, index.embeddings)
    assert loaded.paths == index.paths and loaded.model == "m" and loaded.row_of("7.jpg") == 7
    with pytest.raises(EmbeddingsFormatError, match="not an index folder"):
        EmbeddingIndex.load(tmp_path)
    with pytest.raises(EmbeddingsFormatError, match="queries have 3 dimensions, the index has 8"):
        index.search(np.zeros((1, 3)))
    with pytest.raises(EmbeddingsFormatError, match="1 paths for 100 embeddings"):
        build_index(x, ["a"])


def write_parquet(path: Path, embeddings: np.ndarray, paths: list[str]) -> Path:
    col = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), embeddings.shape[1])
    pq.write_table(pa.table({"path": pa.array(paths), "embedding": col}), path)
    return path


def test_cli_index_build_search_duplicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ornis.cli.main import main

    x = clustered(500, 16, 20)
    x[400] = x[3]
    paths = [f"/photos/{i:03d}.jpg" for i in range(500)]
    emb = write_parquet(tmp_path / "emb.parquet", x, paths)
    assert main(["index", "build", str(emb), "-o", str(tmp_path / "idx")]) == 0
    assert "exact index of 500 x 16" in capsys.readouterr().out
    assert main(["index", "search", str(tmp_path / "idx"), "3", "/photos/010.jpg", "-k", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "3 (row 3)" and out[1].split()[-1] == "/photos/400.jpg" and out[1].split()[1] == "1.0000"
    assert out[3] == "/photos/010.jpg (row 10)" and len(out) == 6
    assert (
        main(["index", "duplicates", str(tmp_path / "idx"), "--threshold", "0.999", "--csv", str(tmp_path / "d.csv")])
        == 0
    )
    assert "1 pair(s)" in capsys.readouterr().out
    assert (tmp_path / "d.csv").read_text().splitlines()[1].startswith("/photos/003.jpg,/photos/400.jpg,")
    assert main(["index", "search", str(tmp_path / "idx"), "999"]) == 1
    assert "out of range" in capsys.readouterr().err


def test_query_images_are_embedded_with_the_index_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ornis.assets import DEMO_MODEL, sample_images
    from ornis.cli.main import main
    from ornis.eval.index import embed_images, resolve_queries

    samples = [str(p) for p in sample_images()]
    index = build_index(embed_images(samples, DEMO_MODEL), samples, model=DEMO_MODEL)
    index.save(tmp_path / "idx")
    outside = tmp_path / "copy.jpg"
    outside.write_bytes(Path(samples[4]).read_bytes())  # not an indexed path: embedded as an image
    vectors, rows = resolve_queries(index, [str(outside), "2"])
    assert rows == [None, 2]
    scores, ids = index.search(vectors, 1, normalized=True)
    assert ids[:, 0].tolist() == [4, 2] and scores[0, 0] == pytest.approx(1.0, abs=1e-5)
    assert main(["index", "search", str(tmp_path / "idx"), str(outside), "-k", "1"]) == 0
    assert capsys.readouterr().out.splitlines()[1].endswith(Path(samples[4]).name)


def test_non_finite_rows_are_refused_or_left_out_and_never_rank_first(tmp_path: Path) -> None:
    # Issue 15, bad 8: NaN rows gave a numpy RuntimeWarning at build, ranked first in every search and made pairs
    # with similarity "nan" in the duplicates report
    x = clustered(100, 8, 5)
    x[10] = np.nan
    x[20, 3] = np.inf
    paths = [f"img/{i}.jpg" for i in range(100)]
    with pytest.raises(EmbeddingsFormatError, match=r"2 of 100 rows have non-finite embeddings.*'img/10.jpg'"):
        build_index(x, paths)
    index = build_index(x, paths, drop_non_finite=True)
    assert len(index) == 98 and index.params == {"dropped_non_finite": 2}
    assert "img/10.jpg" not in index.paths and "img/20.jpg" not in index.paths
    assert np.isfinite(index.embeddings).all()
    _, ids = index.search(index.embeddings[:5], 1, normalized=True)
    assert ids[:, 0].tolist() == [0, 1, 2, 3, 4]  # each row is its own nearest, not a NaN row
    assert all(np.isfinite(p.similarity) for p in near_duplicates(index, threshold=-1.0, neighbours=3))
    with pytest.raises(EmbeddingsFormatError, match="1 of 2 queries have non-finite embeddings"):
        index.search(np.stack([x[0], x[10]]))
    # An index saved before this check existed: refused at load, with what to do
    EmbeddingIndex(x, paths).save(tmp_path / "old")
    with pytest.raises(EmbeddingsFormatError, match="2 of 100 rows have non-finite.*build the index again"):
        EmbeddingIndex.load(tmp_path / "old")


def test_index_arguments_are_validated() -> None:
    index = build_index(clustered(50, 8, 5))
    for threshold in (1.5, -2.0, float("nan")):
        with pytest.raises(ValueError, match="threshold must be a cosine similarity in"):
            near_duplicates(index, threshold)
    with pytest.raises(ValueError, match="neighbours must be a positive integer, got 0"):
        near_duplicates(index, 0.9, neighbours=0)
    for k in (0, -3):
        with pytest.raises(ValueError, match=f"k must be a positive integer, got {k}"):
            index.search(index.embeddings[:1], k)
    with pytest.raises(ValueError, match="target_recall must be in"):
        build_index(clustered(50, 8, 5), target_recall=0.0)


def test_cli_index_refuses_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ornis.cli.main import main

    x = clustered(60, 8, 5)
    x[[4, 7]] = np.nan
    emb = write_parquet(tmp_path / "emb.parquet", x, [f"/photos/{i:03d}.jpg" for i in range(60)])
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "query.jpg").write_text("not an image")
    idx = str(tmp_path / "idx")
    capsys.readouterr()
    for argv, code, text in (
        (["build", str(emb), "-o", idx], 1, f"ornis: error: {emb}: 2 of 60 rows have non-finite embeddings"),
        (["build", str(emb), "-o", str(tmp_path / "a_file")], 1, f"ornis: error: {tmp_path / 'a_file'}: Not a dir"),
        (["build", str(emb), "-o", idx, "--target-recall", "1.5"], 2, "ornis index build: error: argument --target"),
    ):
        assert main(["index", *argv]) == code
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith(text) and "Traceback" not in err
    assert not (tmp_path / "idx").exists()
    assert main(["index", "build", str(emb), "-o", idx, "--drop-non-finite"]) == 0
    assert "exact index of 58 x 8" in capsys.readouterr().out
    for argv, code, text in (
        (["search", idx, "3", "-k", "0"], 2, "ornis index search: error: argument -k: 0 must be at least 1"),
        (["search", idx, str(tmp_path / "query.jpg"), "--model", "ornis_shapes_vit_tiny"], 1, "ornis: error: "),
        (["search", idx, str(tmp_path)], 1, f"ornis: error: query {str(tmp_path)!r} is a folder, not an image file"),
        (["search", idx, "-3"], 1, "ornis: error: query '-3' is not an image file, a row id (0 to 57)"),
        (["duplicates", idx, "--threshold", "1.5"], 2, "ornis index duplicates: error: argument --threshold"),
        (["duplicates", idx, "--csv", str(tmp_path)], 1, f"ornis: error: {tmp_path}: Is a directory"),
    ):
        assert main(["index", *argv]) == code
        err = capsys.readouterr().err
        assert err.strip().splitlines()[-1].startswith(text) and "Traceback" not in err
        if "query.jpg" in argv[2]:
            assert err.strip().endswith("query.jpg: not an image (no known image format)")


def test_a_damaged_index_folder_is_one_typed_error(tmp_path: Path) -> None:
    folder = build_index(clustered(20, 4, 2)).save(tmp_path / "idx")
    meta = (folder / "index.json").read_text()
    (folder / "index.json").write_text("{not json")
    with pytest.raises(EmbeddingsFormatError, match=r"idx: a damaged index \(JSONDecodeError"):
        EmbeddingIndex.load(folder)
    (folder / "index.json").write_text(meta.replace('"dim"', '"width"'))
    with pytest.raises(EmbeddingsFormatError, match=r"a damaged index \(KeyError: 'dim'\)"):
        EmbeddingIndex.load(folder)
    (folder / "index.json").write_text(meta)
    (folder / "embeddings.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(EmbeddingsFormatError, match="a damaged index"):
        EmbeddingIndex.load(folder)
