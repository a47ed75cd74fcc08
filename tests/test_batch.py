"""Batch embedding / classification into Parquet: rows for exactly the good images, equal to infer_image's; every bad
file listed with its reason; resume, retry, the other input kinds, a SIGKILL mid-run."""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import scale_err
from PIL import Image
from support.images import BAD_REASONS, make_bad_images, make_good_images, noisy_tiny_model

import ornis
from ornis.cli import embed as embed_command
from ornis.data.datasets import InputError
from ornis.data.decode import decode_image
from ornis.inference.batch import BatchProgress, OutputFolderError, classify, embed, make_job, read_errors
from ornis.inference.batch import model as batch_model
from ornis.inference.classification import infer_image
from ornis.weights import cache
from ornis.weights.checkpoint import sha256_file

PYTHON = sys.executable
MAX_PIXELS = 1_000_000  # the test bomb is 2 Mpx


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    classes = {f"bird_{i}": i for i in range(7)}
    return ornis.save_model(noisy_tiny_model(7), folder / "vit_t16_tiny.pt", class_to_idx=classes)


@pytest.fixture(scope="module")
def collection(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path], dict[str, Path]]:
    root = tmp_path_factory.mktemp("collection")
    good = make_good_images(root / "good")
    bad = make_bad_images(root / "nested" / "bad")
    (root / "README.txt").write_text("not an image extension: not an input")
    (root / ".hidden.jpg").write_bytes(b"")  # hidden files are left out
    return root, good, bad


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    net, info = ornis.load_pretrained_model(checkpoint, inference=True)
    transform = ornis.classification_transform(ornis.get_size_from_signature(info.signature), info.rgb_stats)
    return net, info, transform


def _expected(reference, path: Path) -> tuple[np.ndarray, np.ndarray]:
    net, _, transform = reference
    # infer_image on the path itself: both paths share open_rgb, 16-bit images included
    return infer_image(net, path, transform, return_embedding=True)


def _run(collection, checkpoint: Path, out: Path, **kw):
    root = collection[0]
    opts = {
        "shard_size": 5,
        "batch_size": 3,
        "num_workers": 2,
        "max_pixels": MAX_PIXELS,
        "progress": False,
        "device": "cpu",
    }
    opts.update(kw)
    return embed([root], model=checkpoint, out=out, **opts)


def test_folder_rows_are_exactly_the_good_images(collection, checkpoint: Path, reference, tmp_path: Path) -> None:
    _, good, bad = collection
    summary = _run(collection, checkpoint, tmp_path / "out")
    table = pq.read_table(tmp_path / "out")
    rows = table.to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(str(p) for p in good.values())
    assert summary.done == len(good) and summary.errors == len(bad) and summary.skipped == 0
    errors = {e["path"]: e["reason"] for e in read_errors(tmp_path / "out")}
    assert set(errors) == {str(p) for p in bad.values()}
    for kind, path in bad.items():
        assert BAD_REASONS[kind] in errors[str(path)], (kind, errors[str(path)])

    assert table.schema.field("embedding").type == pa.list_(pa.float32(), 192)
    worst = 0.0
    for row in rows:
        _, emb = _expected(reference, Path(row["path"]))
        worst = max(worst, scale_err(torch.tensor([row["embedding"]]), torch.from_numpy(emb)))
        assert (row["width"], row["height"]) == Image.open(row["path"]).size
    assert worst < 1e-5, worst

    meta = table.schema.metadata
    assert meta[b"ornis.checkpoint_sha256"].decode() == sha256_file(checkpoint)
    assert meta[b"ornis.model"].decode() == str(checkpoint)
    assert meta[b"ornis.network"] == b"vit_t16"
    assert json.loads(meta[b"ornis.preprocessing"])["size"] == [32, 32]
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    # 17 files cut into shards of 5 (walk order: good/ then nested/bad/)
    assert [s["count"] for s in manifest["shards"]] == [5, 5, 5, 2]
    assert all(s["status"] == "done" for s in manifest["shards"])
    assert sum(s["rows"] for s in manifest["shards"]) == len(good)
    assert sorted(p.name for p in (tmp_path / "out").glob("part-*.parquet")) == [
        f"part-{i:05d}.parquet" for i in range(4)
    ]


def test_resume_skips_done_and_retry_fixes_only_failed(collection, checkpoint: Path, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(collection[0], root)
    local = (root, *collection[1:])
    out = tmp_path / "out"
    _run(local, checkpoint, out)
    parts = {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    first = pq.read_table(out).sort_by("path")

    again = _run(local, checkpoint, out)
    assert (again.done, again.skipped, again.errors) == (0, 12, 0)
    assert {p: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")} == parts  # nothing rewritten

    # The truncated file gets its full bytes back; a retry embeds only it, the other failures stay listed
    fixed = root / "nested" / "bad" / "truncated.jpg"
    Image.open(root / "good" / "rgb.jpg").save(fixed)
    retried = _run(local, checkpoint, out, retry_errors=True)
    assert (retried.done, retried.errors) == (1, 4)
    after = pq.read_table(out).sort_by("path")
    assert after.num_rows == first.num_rows + 1
    assert str(fixed) in after.column("path").to_pylist()
    assert len(set(after.column("path").to_pylist())) == after.num_rows  # no duplicates
    kept = after.filter(pa.compute.not_equal(after.column("path"), str(fixed)))
    assert kept.column("embedding").to_pylist() == first.column("embedding").to_pylist()
    assert str(fixed) not in {e["path"] for e in read_errors(out)}
    assert len(read_errors(out)) == 4


def test_other_job_in_same_folder_is_refused(collection, checkpoint: Path, tmp_path: Path) -> None:
    _run(collection, checkpoint, tmp_path / "out", shard_size=50)
    with pytest.raises(OutputFolderError, match="shard_size"):
        _run(collection, checkpoint, tmp_path / "out", shard_size=7)
    # Same path, other weights: the checkpoint's sha256 tells
    moved = tmp_path / "vit_t16_moving.pt"
    shutil.copy(checkpoint, moved)
    _run(collection, moved, tmp_path / "out2", shard_size=50)
    ornis.save_model(ornis.build_model("vit_t16", num_classes=7, size=32), moved)
    with pytest.raises(OutputFolderError, match="sha256"):
        _run(collection, moved, tmp_path / "out2", shard_size=50)


def test_checkpoint_is_resolved_and_hashed_once(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    hashed: list[str] = []

    def counting_sha256(path, *args, **kwargs):
        hashed.append(str(path))
        return sha256_file(path, *args, **kwargs)

    monkeypatch.setattr(cache, "sha256_file", counting_sha256)  # the shipped demo weights are verified by hashing
    monkeypatch.setattr(batch_model, "sha256_file", counting_sha256)
    samples = Path(ornis.__file__).parent / "assets" / "samples"
    opts = {"num_workers": 0, "batch_size": 8, "shard_size": 4, "progress": False, "device": "cpu"}
    summary = embed([samples], model="ornis_shapes_vit_tiny", out=tmp_path / "out", **opts)
    assert summary.done == 16 and summary.shards_total == 4
    assert len(hashed) == 1, hashed


def test_classify_top_k_equals_infer_image(collection, checkpoint: Path, reference, tmp_path: Path) -> None:
    root, good, _ = collection
    classify(
        [root / "good"],
        model=checkpoint,
        out=tmp_path / "cls",
        top_k=3,
        batch_size=4,
        num_workers=0,
        progress=False,
        device="cpu",
    )
    table = pq.read_table(tmp_path / "cls")
    assert table.num_rows == len(good)
    _, info, _ = reference
    idx_to_class = {v: k for k, v in info.class_to_idx.items()}
    for row in table.to_pylist():
        probs, _ = _expected(reference, Path(row["path"]))
        order = np.argsort(-probs[0])[:3]
        assert row["labels"] == [idx_to_class[int(i)] for i in order]
        np.testing.assert_allclose(row["probabilities"], probs[0][order], rtol=1e-5, atol=1e-7)


def test_input_kinds_give_the_same_rows(collection, checkpoint: Path, tmp_path: Path) -> None:
    root, good, _ = collection
    files = sorted(good.values())
    # webdataset tar: key = name up to the first dot; a .json member beside each image is ignored
    tar_path = tmp_path / "shard-000.tar"
    with tarfile.open(tar_path, "w") as tf:
        for i, p in enumerate(files):
            tf.add(p, arcname=f"sample{i:03d}{p.suffix}")
            meta = tmp_path / f"sample{i:03d}.json"
            meta.write_text("{}")
            tf.add(meta, arcname=meta.name)
    (tmp_path / "list.txt").write_text("# a comment\n\n" + "\n".join(str(p) for p in files[:4]) + "\n")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "path"])
        w.writerows([["x", os.path.relpath(p, tmp_path)] for p in files[4:8]])
    pq.write_table(pa.table({"path": [str(p) for p in files[8:]]}), tmp_path / "list.parquet")
    opts = {"batch_size": 4, "num_workers": 1, "progress": False, "max_pixels": MAX_PIXELS, "device": "cpu"}

    embed(
        [tmp_path / "list.txt", tmp_path / "list.csv", tmp_path / "list.parquet"],
        model=checkpoint,
        out=tmp_path / "lists",
        **opts,
    )
    embed([tar_path], model=checkpoint, out=tmp_path / "tar", **opts)
    embed([str(root / "good" / "*.*")], model=checkpoint, out=tmp_path / "glob", **opts)
    by_path = {r["path"]: r["embedding"] for r in pq.read_table(tmp_path / "glob").to_pylist()}
    assert sorted(by_path) == sorted(str(p) for p in files)
    lists = {os.path.normpath(r["path"]): r["embedding"] for r in pq.read_table(tmp_path / "lists").to_pylist()}
    assert lists == by_path
    tar_rows = pq.read_table(tmp_path / "tar").to_pylist()
    assert [r["path"] for r in tar_rows] == [f"{tar_path}:sample{i:03d}" for i in range(len(files))]
    assert [r["embedding"] for r in tar_rows] == [by_path[str(p)] for p in files]


def test_float16_embeddings_and_feature_maps(collection, checkpoint: Path, reference, tmp_path: Path) -> None:
    root, good, _ = collection
    embed(
        [root / "good"],
        model=checkpoint,
        out=tmp_path / "out",
        embedding_dtype="float16",
        features="neck",
        shard_size=8,
        num_workers=0,
        progress=False,
        device="cpu",
    )
    table = pq.read_table(tmp_path / "out")
    assert table.schema.field("embedding").type == pa.list_(pa.float16(), 192)
    feats = [np.load(p) for p in sorted((tmp_path / "out" / "_features").glob("part-*.neck.npy"))]
    assert [f.shape for f in feats] == [(8, 192, 2, 2), (len(good) - 8, 192, 2, 2)]
    assert feats[0].dtype == np.float16
    net, _, transform = reference
    first = pq.read_table(tmp_path / "out" / "part-00000.parquet").column("path")[0].as_py()
    image = decode_image(first).image
    expected = net.detection_features(transform(image).unsqueeze(0))["neck"]
    assert scale_err(torch.from_numpy(feats[0][:1].astype(np.float32)), expected) < 2e-3  # float16 rounding


def test_progress_bar_shows_rate_and_eta(capsys: pytest.CaptureFixture[str]) -> None:
    bar = BatchProgress(total=100, world_size=2, enabled=True)
    bar.bar.start_t -= 10.0  # 10 s ago
    bar.update(25)  # 25 here, 50 across both ranks: 5 images/s, 50 to go -> 10 s
    bar.close()
    err = capsys.readouterr().err
    assert "50/100 images" in err and "5.00 images/s" in err and "ETA 00:10" in err


def test_cli_defaults_are_the_library_defaults() -> None:
    parser = argparse.ArgumentParser(prog="ornis")
    embed_command.register(parser.add_subparsers())
    for task in ("embed", "classify"):
        for flag in ("-o", "--output", "--out"):  # --out: the older spelling
            args = parser.parse_args([task, "photos/", "-m", "model.pt", flag, "emb/"])
            assert embed_command.job_from_args(args) == make_job(["photos/"], model="model.pt", out="emb/", task=task)
    args = parser.parse_args(["embed", "a", "-m", "m", "-o", "o", "--float16", "--precision", "bf16", "--workers", "2"])
    job = embed_command.job_from_args(args)
    assert (job.inputs, job.embedding_dtype, job.precision, job.num_workers) == (("a",), "float16", "bfloat16", 2)


def _cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [PYTHON, "-m", "ornis", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw
    )


def _rows(out: Path) -> list[tuple[str, list[float]]]:
    return sorted((r["path"], r["embedding"]) for r in pq.read_table(out).to_pylist())


@pytest.mark.slow
def test_sigkill_midway_then_rerun_gives_the_same_rows(tmp_path: Path, checkpoint: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    for i in range(60):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photos / f"p{i:03d}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    args = [
        "embed",
        str(photos),
        "-m",
        str(checkpoint),
        "--shard-size",
        "3",
        "--batch-size",
        "1",
        "--workers",
        "0",
        "--no-progress",
        "--device",
        "cpu",
    ]

    whole = _cli([*args, "-o", str(tmp_path / "whole")])
    assert whole.wait(timeout=300) == 0, whole.stderr.read()

    killed = _cli([*args, "-o", str(tmp_path / "killed")])
    deadline = time.time() + 240
    while not list((tmp_path / "killed").glob("part-*.parquet")) and time.time() < deadline and killed.poll() is None:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done_before = len(list((tmp_path / "killed").glob("part-*.parquet")))
    assert killed.returncode == -signal.SIGKILL
    assert 1 <= done_before < 21, done_before  # really killed mid-way

    rerun = _cli([*args, "-o", str(tmp_path / "killed")])
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()
    assert len(list((tmp_path / "killed").glob("part-*.parquet"))) == 21
    assert not list((tmp_path / "killed").glob(".*.tmp"))
    assert _rows(tmp_path / "killed") == _rows(tmp_path / "whole")
    assert len(_rows(tmp_path / "whole")) == 60
    assert [e["path"] for e in read_errors(tmp_path / "killed")] == [str(photos / "broken.jpg")]


def test_bad_inputs_fail_before_anything_is_written(checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        embed([tmp_path / "missing"], model=checkpoint, out=tmp_path / "out", progress=False)
    with pytest.raises(InputError, match="matches no file"):
        embed([str(tmp_path / "*.jpg")], model=checkpoint, out=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_feature_stage_is_refused(collection, checkpoint: Path, tmp_path: Path) -> None:
    with pytest.raises(ornis.OrnisError, match="no feature map 'stage9'; this model has neck"):
        _run(collection, checkpoint, tmp_path / "out", features="stage9")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_bf16_compiled_rows_match_cpu_fp32(collection, checkpoint: Path, tmp_path: Path) -> None:
    cpu = _run(collection, checkpoint, tmp_path / "cpu")
    gpu32 = _run(collection, checkpoint, tmp_path / "gpu32", device="cuda", precision="float32", channels_last=True)
    gpu16 = _run(collection, checkpoint, tmp_path / "gpu16", device="cuda", precision="bfloat16", compile=True)
    assert cpu.done == gpu32.done == gpu16.done == 12
    ref = pq.read_table(tmp_path / "cpu").sort_by("path")
    a = np.array(ref.column("embedding").to_pylist())
    b = np.array(pq.read_table(tmp_path / "gpu32").sort_by("path").column("embedding").to_pylist())
    c = np.array(pq.read_table(tmp_path / "gpu16").sort_by("path").column("embedding").to_pylist())
    assert np.abs(a - b).max() / np.abs(a).max() < 1e-3  # TF32 / kernel differences only
    cosine = (a * c).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(c, axis=1)
    assert cosine.min() > 0.99, cosine.min()


def test_decode_on_device_is_close_to_pillow(collection, checkpoint: Path, tmp_path: Path) -> None:
    # On CPU this runs torchvision's libjpeg-turbo decoder (nvJPEG on CUDA) and torch's bicubic antialiased resize
    _, _, bad = collection
    _run(collection, checkpoint, tmp_path / "pil", num_workers=0)
    _run(collection, checkpoint, tmp_path / "dev", num_workers=0, decode_on_device=True)
    a, b = (pq.read_table(tmp_path / name).sort_by("path") for name in ("pil", "dev"))
    assert a.column("path").to_pylist() == b.column("path").to_pylist()
    ea, eb = np.array(a.column("embedding").to_pylist()), np.array(b.column("embedding").to_pylist())
    cosine = (ea * eb).sum(1) / np.linalg.norm(ea, axis=1) / np.linalg.norm(eb, axis=1)
    assert cosine.min() > 0.999, cosine.min()
    jpegs = [i for i, p in enumerate(a.column("path").to_pylist()) if p.endswith(".jpg") and "cmyk" not in p]
    assert len(jpegs) == 2 and np.abs(ea[jpegs] - eb[jpegs]).max() > 0  # those really took the other path
    errors = {e["path"]: e["reason"] for e in read_errors(tmp_path / "dev")}
    assert set(errors) == {str(p) for p in bad.values()}
    assert errors[str(bad["truncated"])] == "corrupt or truncated JPEG (Image is incomplete or truncated)"
    meta = json.loads(b.schema.metadata[b"ornis.preprocessing"])
    assert meta["jpeg_decoding"].startswith("torchvision decode_jpeg")
