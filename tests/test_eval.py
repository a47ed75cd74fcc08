"""k-NN and linear-probe evaluation on embeddings with known structure, and reading ``ornis embed``'s Parquet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ornis.errors import EmbeddingsFormatError
from ornis.eval import EmbeddingTable, evaluate_knn, evaluate_linear_probe, knn_predict, read_embeddings
from ornis.eval.labels import stratified_split
from ornis.eval.metrics import classification_report

NUM_CLASSES = 10
CHANCE = 1 / NUM_CLASSES


def gaussian_clusters(n: int, dim: int, separation: float, seed: int = 0) -> EmbeddingTable:
    """Class c is N(separation * mu_c, I) with random unit-variance centres mu_c: the Bayes accuracy is well below
    1 for small separations, so the methods have to do real work."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(size=(NUM_CLASSES, dim))
    labels = np.arange(n) % NUM_CLASSES
    x = (separation * centres[labels] + rng.normal(size=(n, dim))).astype(np.float32)
    names = [f"class_{c}" for c in range(NUM_CLASSES)]
    return EmbeddingTable(
        [f"/data/{names[c]}/{i}.jpg" for i, c in enumerate(labels)], x, labels.astype(np.int64), names
    )


def nearest_centre_accuracy(train: EmbeddingTable, test: EmbeddingTable) -> float:
    """A reference classifier that knows the structure: the nearest class mean."""
    means = np.stack([train.embeddings[train.labels == c].mean(0) for c in range(NUM_CLASSES)])
    d = ((test.embeddings[:, None, :] - means[None]) ** 2).sum(-1)
    return float((d.argmin(1) == test.labels).mean())


def test_knn_votes_match_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    train, query = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    labels = rng.integers(0, 4, size=50)
    got = knn_predict(train, labels, query, 4, k=5, temperature=0.1)
    tn = train / np.linalg.norm(train, axis=1, keepdims=True)
    qn = query / np.linalg.norm(query, axis=1, keepdims=True)
    sim = qn @ tn.T
    want = np.zeros((7, 4))
    for q in range(7):
        for j in np.argsort(-sim[q])[:5]:
            want[q, labels[j]] += np.exp(sim[q, j] / 0.1)
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_knn_leave_one_out_never_counts_the_query_itself() -> None:
    # Each point's only same-class partner is far away; with itself counted, 1-NN would always be right
    x = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=np.float32)
    labels = np.array([0, 1, 0, 1])
    scores = knn_predict(x, labels, x, 2, k=1, exclude_self=True)
    assert scores.argmax(1).tolist() == [1, 0, 1, 0]


def test_knn_and_linear_probe_beat_chance_on_gaussian_clusters() -> None:
    train = gaussian_clusters(2000, 32, separation=0.35, seed=0)
    test = gaussian_clusters(1000, 32, separation=0.35, seed=1)
    bayes_like = nearest_centre_accuracy(train, test)
    knn = evaluate_knn(train, test)
    linear = evaluate_linear_probe(train, test, epochs=60)
    # Measured: nearest centre 0.615, k-NN 0.501, linear probe 0.618 (chance 0.10)
    assert knn.top1 >= CHANCE + 0.30, knn.format()
    assert linear.top1 >= CHANCE + 0.40, linear.format()
    assert linear.top1 >= bayes_like - 0.06  # a linear model is the right model here: close to the oracle
    assert knn.top5 > knn.top1 and linear.top5 > linear.top1
    assert knn.count == linear.count == 1000
    assert sum(s for s, _, _ in knn.per_class.values()) == 1000
    assert linear.details["lr"] in (1e-3, 1e-2) and linear.details["weight_decay"] in (0.0, 1e-4, 1e-3)


def test_well_separated_clusters_are_classified_perfectly() -> None:
    table = gaussian_clusters(500, 16, separation=6.0)
    assert evaluate_knn(table).top1 == 1.0  # leave-one-out
    assert evaluate_linear_probe(table, epochs=30).top1 == 1.0  # held-out 20 %


def test_random_labels_stay_at_chance() -> None:
    table = gaussian_clusters(2000, 32, separation=0.35)
    table.labels = np.random.default_rng(5).permutation(table.labels)
    assert abs(evaluate_knn(table).top1 - CHANCE) < 0.05


def test_classification_report_counts() -> None:
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1], [0.1, 0.2, 0.7], [0.6, 0.3, 0.1]])
    report = classification_report(scores, np.array([0, 1, 1, 2]), ["a", "b", "c"])
    assert report.top1 == 0.5 and report.top5 == 1.0
    assert report.per_class["a"] == (1, 0.5, 1.0)  # a predicted twice, right once
    assert report.per_class["b"] == (2, 1.0, 0.5)
    assert report.per_class["c"] == (1, 0.0, 0.0)


def test_stratified_split_holds_out_each_class() -> None:
    labels = np.repeat(np.arange(5), 20)
    kept, out = stratified_split(labels, 0.25)
    assert len(out) == 25 and len(kept) == 75 and not set(kept) & set(out)
    assert np.bincount(labels[out]).tolist() == [5] * 5


def write_embed_parquet(path: Path, table: EmbeddingTable, extra: dict | None = None) -> Path:
    """A file in ``ornis embed``'s layout: ``path``, ``embedding`` (fixed-size list<float32>), metadata."""
    dim = table.embeddings.shape[1]
    cols = {
        "path": pa.array(table.paths),
        "embedding": pa.FixedSizeListArray.from_arrays(pa.array(table.embeddings.reshape(-1)), dim),
        **(extra or {}),
    }
    pq.write_table(pa.table(cols).replace_schema_metadata({"ornis.model": "some_model"}), path)
    return path


def test_read_embeddings_labels_from_folders_and_columns(tmp_path: Path) -> None:
    table = gaussian_clusters(40, 6, separation=1.0)
    path = write_embed_parquet(tmp_path / "emb.parquet", table, {"species": pa.array([f"s{c}" for c in table.labels])})
    read = read_embeddings(path)
    np.testing.assert_array_equal(read.embeddings, table.embeddings)
    assert read.class_names == table.class_names and (read.labels == table.labels).all()
    assert read.model == "some_model"
    by_column = read_embeddings(path, label_column="species")
    assert by_column.class_names == [f"s{c}" for c in range(NUM_CLASSES)] and (by_column.labels == table.labels).all()
    with pytest.raises(EmbeddingsFormatError, match="no label column 'genus'"):
        read_embeddings(path, label_column="genus")
    with pytest.raises(EmbeddingsFormatError, match="not among the 2 known classes"):
        read_embeddings(path, class_names=["class_0", "class_1"])
    pq.write_table(pa.table({"path": pa.array(["a"])}), tmp_path / "bad.parquet")
    with pytest.raises(EmbeddingsFormatError, match="expected a 'embedding' column"):
        read_embeddings(tmp_path / "bad.parquet")


def test_cli_eval_knn_and_linear(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ornis.cli.main import main

    train = write_embed_parquet(tmp_path / "train.parquet", gaussian_clusters(600, 16, separation=1.0, seed=0))
    test = write_embed_parquet(tmp_path / "test.parquet", gaussian_clusters(300, 16, separation=1.0, seed=1))
    assert main(["eval", "knn", str(train), "--test", str(test), "-k", "10", "--json", str(tmp_path / "knn.json")]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "class_9" in out
    knn = json.loads((tmp_path / "knn.json").read_text())
    assert knn["count"] == 300 and knn["k"] == 10 and knn["top1"] > CHANCE + 0.3
    assert (
        main(["eval", "linear", str(train), "--epochs", "20", "--lrs", "0.01", "--json", str(tmp_path / "lin.json")])
        == 0
    )
    lin = json.loads((tmp_path / "lin.json").read_text())
    assert lin["count"] == 120 and lin["top1"] > CHANCE + 0.3  # 20 % of 600 held out
    assert main(["eval", "knn", str(tmp_path / "missing.parquet")]) == 1
    assert "no such embeddings file" in capsys.readouterr().err


def with_bad_rows(table: EmbeddingTable, rows: list[int]) -> EmbeddingTable:
    """A copy of ``table`` whose ``rows`` hold NaN (first) and Inf (the others)."""
    bad = EmbeddingTable(table.paths, table.embeddings.copy(), table.labels, table.class_names, source="emb.parquet")
    bad.embeddings[rows[0]] = np.nan
    for r in rows[1:]:
        bad.embeddings[r, 3] = np.inf
    return bad


def test_non_finite_rows_are_refused_with_a_count_or_left_out_when_asked() -> None:
    # Issue 15, bad 5/6: two NaN/Inf rows of 48 took k-NN top-1 from 0.958 to 0.104, silently
    table = gaussian_clusters(48, 8, separation=3.0)
    bad = with_bad_rows(table, [5, 9])
    for evaluate in (evaluate_knn, evaluate_linear_probe):
        with pytest.raises(EmbeddingsFormatError, match=r"emb.parquet: 2 of 48 rows have non-finite embeddings"):
            evaluate(bad)
    kept = np.setdiff1d(np.arange(48), [5, 9])
    dropped = evaluate_knn(bad, drop_non_finite=True)
    assert dropped.details["dropped_non_finite"] == 2 and dropped.count == 46
    assert dropped.top1 == evaluate_knn(table.subset(kept)).top1 >= 0.9
    test = gaussian_clusters(30, 8, separation=3.0, seed=1)
    with pytest.raises(EmbeddingsFormatError, match="2 of 30 rows"):
        evaluate_knn(table, with_bad_rows(test, [0, 1]))
    linear = evaluate_linear_probe(bad, epochs=20, drop_non_finite=True)
    assert linear.details["dropped_non_finite"] == 2 and linear.top5 >= linear.top1 >= 0.9


def test_top5_never_below_top1() -> None:
    # Issue 15, bad 6: `eval linear` reported top-1 0.875 and top-5 0.750. argmax ranks NaN first and argpartition
    # last, so top-1 and top-5 disagreed; ties could split them the same way
    nan = np.full((8, 8), np.nan)
    report = classification_report(nan, np.zeros(8, dtype=np.int64), list("abcdefgh"))
    assert report.top5 >= report.top1
    ties = np.zeros((6, 8))
    ties[:, 7] = np.nan
    report = classification_report(ties, np.array([0, 0, 0, 1, 5, 7]), list("abcdefgh"))
    assert (report.top1, report.top5) == (0.5, 4 / 6)  # ties go to the lower index (top-5 is 0-4); NaN ranks last
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 3, size=(500, 12)).astype(float)
    scores[rng.random(scores.shape) < 0.1] = np.nan
    labels = rng.integers(0, 12, size=500)
    report = classification_report(scores, labels, [str(i) for i in range(12)])
    top1_rows = np.nanargmax(np.where(np.isnan(scores), -np.inf, scores), axis=1) == labels
    assert report.top1 == top1_rows.mean() and report.top5 >= report.top1


def test_a_diverged_linear_probe_is_never_chosen_or_reported() -> None:
    table = gaussian_clusters(200, 8, separation=3.0)
    from ornis.errors import OrnisError

    with pytest.raises(OrnisError, match="diverged"):
        evaluate_linear_probe(table, lrs=[1e30], weight_decays=[1e-3], epochs=3)
    report = evaluate_linear_probe(table, lrs=[1e30, 1e-2], weight_decays=[1e-3], epochs=20)
    assert report.details["lr"] == 1e-2 and report.top1 >= 0.9


def test_k_and_temperature_are_validated() -> None:
    # Issue 15, bad 7: --temperature 0 was accepted and reported 0.375; -k 0 was a traceback
    table = gaussian_clusters(60, 8, separation=3.0)
    for k in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match=f"k must be a positive integer, got {k!r}"):
            evaluate_knn(table, k=k)
    for t in (0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="temperature must be above 0"):
            evaluate_knn(table, temperature=t)
        with pytest.raises(ValueError, match="temperature must be above 0"):
            knn_predict(table.embeddings, table.labels, table.embeddings, NUM_CLASSES, temperature=t)
    with pytest.raises(TypeError, match="temperature must be a number"):
        evaluate_knn(table, temperature="0.07")
    # exp(cos / T) overflows float32 below T ~ 0.011: the votes stay finite and rank the classes as before
    tiny = knn_predict(
        table.embeddings, table.labels, table.embeddings, NUM_CLASSES, temperature=1e-4, exclude_self=True
    )
    assert np.isfinite(tiny).all() and evaluate_knn(table, temperature=1e-4).top1 == evaluate_knn(table, k=1).top1
    assert evaluate_knn(table, k=3, temperature=float("inf")).top1 >= 0.9  # T = inf: plain majority vote


def test_linear_probe_arguments_are_validated() -> None:
    table = gaussian_clusters(60, 8, separation=3.0)
    for kwargs, name in (
        ({"epochs": 0}, "epochs"),
        ({"held_out": 1.5}, "held_out"),
        ({"held_out": 0.0}, "held_out"),
        ({"lrs": []}, "lrs"),
        ({"lrs": [-0.1]}, "lrs"),
        ({"weight_decays": [float("nan")]}, "weight_decays"),
    ):
        with pytest.raises(ValueError, match=f"^{name} must be"):
            evaluate_linear_probe(table, **kwargs)


def test_unlabelled_single_class_empty_and_null_labels_are_errors_naming_the_file(tmp_path: Path) -> None:
    # Issue 15, bad 4: a flat folder gave top-1 1.0 for a single class; paths without a parent a class named ""
    table = gaussian_clusters(40, 6, separation=1.0)
    flat = EmbeddingTable([f"/photos/{i}.jpg" for i in range(40)], table.embeddings)
    path = write_embed_parquet(tmp_path / "flat.parquet", flat)
    for evaluate, what in ((evaluate_knn, "k-NN evaluation"), (evaluate_linear_probe, "a linear probe")):
        with pytest.raises(EmbeddingsFormatError, match=f"flat.parquet: {what} needs at least 2 classes, found 1"):
            evaluate(read_embeddings(path))
    bare = write_embed_parquet(
        tmp_path / "bare.parquet", EmbeddingTable([f"{i}.jpg" for i in range(40)], flat.embeddings)
    )
    with pytest.raises(EmbeddingsFormatError, match=r"bare.parquet: 40 of 40 paths have no parent folder.*'0.jpg'"):
        read_embeddings(bare)
    assert len(read_embeddings(bare, labelled=False)) == 40
    nulls = pa.array([None if i in (3, 8) else ("" if i == 9 else f"s{i % 4}") for i in range(40)])
    labelled = write_embed_parquet(tmp_path / "nulls.parquet", table, {"species": nulls})
    with pytest.raises(EmbeddingsFormatError, match=r"nulls.parquet: 3 of 40 rows have no label in column 'species'"):
        read_embeddings(labelled, label_column="species")
    empty = write_embed_parquet(tmp_path / "empty.parquet", EmbeddingTable([], np.zeros((0, 6), np.float32)))
    with pytest.raises(EmbeddingsFormatError, match="empty.parquet: no rows"):
        read_embeddings(empty, labelled=False)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(EmbeddingsFormatError, match="junk.parquet: not a Parquet file"):
        read_embeddings(tmp_path / "junk.parquet")
    one = EmbeddingTable(table.paths[:10], table.embeddings[:10], np.zeros(10, np.int64), table.class_names)
    with pytest.raises(EmbeddingsFormatError, match=r"needs at least 2 classes, found 1 \('class_0'\)"):
        evaluate_knn(one)


def test_cli_eval_refuses_bad_input_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ornis.cli.main import main

    table = gaussian_clusters(60, 8, separation=3.0)
    good = write_embed_parquet(tmp_path / "train.parquet", table)
    bad = write_embed_parquet(tmp_path / "bad.parquet", with_bad_rows(table, [5, 9]))
    capsys.readouterr()
    for argv, code, text in (
        (["knn", str(good), "-k", "0"], 2, "ornis eval knn: error: argument -k: 0 must be at least 1"),
        (["knn", str(good), "--temperature", "0"], 2, "ornis eval knn: error: argument --temperature: 0 must be above"),
        (["linear", str(good), "--held-out", "1"], 2, "ornis eval linear: error: argument --held-out: 1 must be below"),
        (["knn", str(bad)], 1, f"ornis: error: {bad}: 2 of 60 rows have non-finite embeddings"),
        (["knn", str(good), "--json", str(tmp_path)], 1, f"ornis: error: {tmp_path}: Is a directory"),
    ):
        assert main(["eval", *argv]) == code
        captured = capsys.readouterr()
        assert captured.err.strip().splitlines()[-1].startswith(text) and "Traceback" not in captured.err
        assert "top-1" not in captured.out  # refused before the work
    assert main(["eval", "knn", str(bad), "--drop-non-finite", "--json", str(tmp_path / "r.json")]) == 0
    assert "dropped_non_finite=2" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["count"] == 58 and report["dropped_non_finite"] == 2
