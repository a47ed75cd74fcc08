"""The offline first run: the shipped model is a normal registry entry found in the package, and ``ornis demo``'s
library path does real work with ORNIS_OFFLINE=1 (no cache, no network)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import ornis
from ornis.assets import DEMO_MODEL, DEMO_MODEL_FILE, DEMO_MODEL_SHA256, sample_images
from ornis.errors import ChecksumError
from ornis.eval.synthetic import SHAPE_CLASSES
from ornis.weights import manifest
from ornis.weights.cache import resolve_weights
from ornis.weights.checkpoint import sha256_file

# scripts/train_tiny_model.py measured the shipped model on 2,000 held-out generated images (training_summary.json);
# the demo's images are the first of that same set, so its accuracy must sit near that number (chance is 1/8)
TRAINING_SUMMARY = json.loads((DEMO_MODEL_FILE.parent / "training_summary.json").read_text())
MIN_DEMO_TOP1 = 0.6
MIN_DEMO_KNN_TOP1 = 0.5


def test_shipped_model_is_a_registered_weights_entry_in_the_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("ORNIS_OFFLINE", "1")
    monkeypatch.setenv("ORNIS_CACHE", str(tmp_path / "empty-cache"))
    assert DEMO_MODEL in ornis.list_pretrained_models()
    assert DEMO_MODEL_FILE.stat().st_size < 10e6  # the limit
    assert sha256_file(DEMO_MODEL_FILE) == DEMO_MODEL_SHA256
    assert resolve_weights(DEMO_MODEL) == DEMO_MODEL_FILE
    assert not (tmp_path / "empty-cache").exists()  # found in the package, nothing written to the cache
    net, info = ornis.load_pretrained_model(DEMO_MODEL, inference=True)
    assert sorted(info.class_to_idx) == list(SHAPE_CLASSES) and net.num_classes == 8
    assert ornis.get_size_from_signature(info.signature) == (48, 48)
    assert sum(p.numel() for p in net.parameters()) < 1_000_000


def test_a_tampered_shipped_model_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = tmp_path / "model.pt"
    bad.write_bytes(DEMO_MODEL_FILE.read_bytes()[:-10] + b"0123456789")
    weights = manifest.get_weights(DEMO_MODEL)
    monkeypatch.setitem(weights.extra, "local_path", str(bad))
    with pytest.raises(ChecksumError, match="reinstall ornis"):
        resolve_weights(DEMO_MODEL)


def test_demo_runs_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ornis.eval.demo import run_demo

    monkeypatch.setenv("ORNIS_OFFLINE", "1")
    monkeypatch.setenv("ORNIS_CACHE", str(tmp_path / "empty-cache"))
    samples = sample_images()
    assert len(samples) == 16 and all(p.stat().st_size < 8_000 for p in samples)
    result = run_demo(tmp_path / "out", held_out=200)
    embeddings = pq.read_table(tmp_path / "out" / "embeddings")
    classes = pq.read_table(tmp_path / "out" / "classes")
    assert embeddings.num_rows == classes.num_rows == len(result.samples) == 16
    assert embeddings.schema.field("embedding").type.list_size == 128
    assert embeddings.schema.metadata[b"ornis.model"] == DEMO_MODEL.encode()
    assert all(len(s.neighbours) == 3 for s in result.samples)
    assert result.held_out_count == 200
    assert result.held_out_top1 >= MIN_DEMO_TOP1, result.format()
    assert abs(result.held_out_top1 - TRAINING_SUMMARY["held_out_top1"]) < 0.1, result.format()
    assert result.held_out_knn_top1 >= MIN_DEMO_KNN_TOP1, result.format()
    assert result.sample_top1 >= 0.5, result.format()
    text = result.format()
    assert "held-out generated set (200 images" in text and "nearest neighbours" in text
    assert not (tmp_path / "empty-cache").exists()


def test_cli_demo(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from ornis.cli.main import main

    monkeypatch.setenv("ORNIS_OFFLINE", "1")
    assert main(["demo", "-o", str(tmp_path / "demo"), "--held-out", "80"]) == 0
    out = capsys.readouterr().out
    assert "checker_0.jpg" in out and "held-out generated set (80 images" in out
    assert sorted(p.name for p in (tmp_path / "demo" / "embeddings").glob("part-*.parquet")) == ["part-00000.parquet"]


def test_demo_checks_its_arguments_and_output_before_the_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 15: `ornis demo -o FILE` and `--held-out -5` failed with a traceback after classifying and embedding
    import ornis.eval.demo as demo
    from ornis.cli.main import main

    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the demo started its work before checking its arguments")

    monkeypatch.setattr(demo, "embed", no_work)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("x")
    for held_out in (-5, 0, 1):
        with pytest.raises(ValueError, match=f"held_out must be an integer >= 2, got {held_out}"):
            demo.run_demo(tmp_path / "out", held_out=held_out)
    with pytest.raises(ValueError, match="neighbours must be an integer >= 1, got 0"):
        demo.run_demo(tmp_path / "out", neighbours=0)
    with pytest.raises(FileExistsError):
        demo.run_demo(tmp_path / "a_file")
    capsys.readouterr()
    for argv, code, text in (
        (["-o", str(tmp_path / "a_file")], 1, f"ornis: error: {tmp_path / 'a_file'}: Not a directory"),
        (["-o", str(tmp_path / "a_file" / "sub")], 1, f"ornis: error: {tmp_path / 'a_file'}: Not a directory"),
        (["--held-out", "-5"], 2, "ornis demo: error: argument --held-out: -5 must be at least 2"),
        (["--held-out", "1"], 2, "ornis demo: error: argument --held-out: 1 must be at least 2"),
    ):
        assert main(["demo", *argv]) == code
        captured = capsys.readouterr()
        assert captured.err.strip().splitlines()[-1].startswith(text)
        assert "Traceback" not in captured.err and captured.out == ""
    assert not (tmp_path / "out").exists() and not (tmp_path / "ornis-demo").exists()
