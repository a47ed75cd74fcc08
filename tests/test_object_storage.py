"""Inputs and outputs in object storage: ``ornis embed s3://...`` against a real S3-compatible server (moto's, on
127.0.0.1) through the real clients. Every good image once, errors listed, a SIGKILL mid-run resumed to the rows of
an uninterrupted run, the output read straight from the bucket by pyarrow's own S3 client; local paths unchanged."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support.images import make_bad_images, make_good_images, noisy_tiny_model
from support.s3 import S3Server, running_s3_server

import ornis
from ornis.cli.main import main
from ornis.data.datasets import InputError
from ornis.inference.batch import OutputFolderError, embed, read_errors
from ornis.inference.batch.sampler import check_claims_possible
from ornis.utils.storage import StorageError, filesystem, read_many

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_PIXELS = 1_000_000  # the test bomb is 2 Mpx
OPTS = {"shard_size": 5, "batch_size": 3, "num_workers": 1, "max_pixels": MAX_PIXELS, "progress": False}


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3Server]:
    with running_s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ornis.save_model(noisy_tiny_model(7), tmp_path_factory.mktemp("ckpt") / "vit_t16_tiny.pt")


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], list[str]]:
    """A local folder of good and bad images (and a hidden one), its good and bad names relative to it."""
    root = tmp_path_factory.mktemp("photos")
    good = make_good_images(root / "good")
    bad = make_bad_images(root / "nested" / "bad")
    (root / ".hidden" / "x.jpg").parent.mkdir()
    (root / ".hidden" / "x.jpg").write_bytes(b"")
    (root / "README.txt").write_text("not an image")
    rel = lambda ps: sorted(p.relative_to(root).as_posix() for p in ps)  # noqa: E731
    return root, rel(good.values()), rel(bad.values())


def _rows(table) -> dict[str, list[float]]:
    return {r["path"]: r["embedding"] for r in table.to_pylist()}


def _local_rows(photos, checkpoint: Path, out: Path) -> dict[str, list[float]]:
    root = photos[0]
    embed([root], model=checkpoint, out=out, device="cpu", **OPTS)
    return {os.path.relpath(k, root): v for k, v in _rows(pq.read_table(out)).items()}


def test_folder_in_a_bucket_to_a_bucket(s3_server: S3Server, photos, checkpoint: Path, tmp_path: Path) -> None:
    root, good, bad = photos
    bucket = s3_server.make_bucket("folder")
    s3_server.upload(root, f"{bucket}/photos/")
    summary = embed([f"{bucket}/photos/"], model=checkpoint, out=f"{bucket}/emb", device="cpu", **OPTS)
    assert (summary.done, summary.errors, summary.skipped) == (len(good), len(bad), 0)

    # pyarrow's own S3 client reads the output straight from the bucket: exactly the rows, nothing else
    table = ds.dataset("folder/emb", format="parquet", filesystem=s3_server.arrow_filesystem()).to_table()
    rows = {k.removeprefix(f"{bucket}/photos/"): v for k, v in _rows(table).items()}
    assert rows == _local_rows(photos, checkpoint, tmp_path / "local")  # the same rows as from local disk
    assert sorted(rows) == good
    errors = read_errors(f"{bucket}/emb")
    assert sorted(e["path"] for e in errors) == [f"{bucket}/photos/{b}" for b in bad]
    keys = s3_server.keys(f"{bucket}/emb")
    assert [k for k in keys if k.startswith("part-")] == [f"part-{i:05d}.parquet" for i in range(4)]
    assert {"_manifest.json", "_plan.parquet", "_errors.jsonl"} <= set(keys)
    assert not [k for k in keys if k.startswith("_claims") or ".tmp" in k]

    again = embed([f"{bucket}/photos"], model=checkpoint, out=f"{bucket}/emb/", device="cpu", **OPTS)
    assert (again.done, again.skipped) == (0, len(good))  # resumed: same job, however the URL is spelt


def test_file_list_and_glob_in_a_bucket(s3_server: S3Server, photos, checkpoint: Path, tmp_path: Path) -> None:
    root, good, _ = photos
    bucket = s3_server.make_bucket("lists")
    s3_server.upload(root, f"{bucket}/photos/")
    # relative entries are under the list's folder; a URL is taken as it is
    listing = "\n".join([f"photos/{g}" for g in good[:3]] + [f"{bucket}/photos/{good[3]}"]) + "\n"
    s3_server.filesystem().pipe_file("lists/list.txt", listing.encode())
    embed([f"{bucket}/list.txt", f"{bucket}/photos/good/*.png"], model=checkpoint, out=tmp_path / "out", **OPTS)
    rows = _rows(pq.read_table(tmp_path / "out"))  # a local output folder, as today
    pngs = [g for g in good if g.startswith("good/") and g.endswith(".png")]
    assert sorted(rows) == sorted({f"{bucket}/photos/{g}" for g in [*good[:4], *pngs]})
    local = _local_rows(photos, checkpoint, tmp_path / "local")
    assert all(v == local[k.removeprefix(f"{bucket}/photos/")] for k, v in rows.items())


def _tar(folder: Path, names: list[str], root: Path) -> Path:
    path = folder / "shard-000.tar"
    with tarfile.open(path, "w") as tf:
        for i, name in enumerate(names):
            tf.add(root / name, arcname=f"sample{i:03d}{Path(name).suffix}")
    return path


def test_tars_in_a_bucket(s3_server: S3Server, photos, checkpoint: Path, tmp_path: Path) -> None:
    root, good, _ = photos
    bucket = s3_server.make_bucket("tars")
    tar = _tar(tmp_path, good, root)
    s3_server.upload(tar, f"{bucket}/shards/shard-000.tar")
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    s3_server.upload(truncated, f"{bucket}/shards/shard-001.tar")

    summary = embed([f"{bucket}/shards/*.tar"], model=checkpoint, out=f"{bucket}/emb", device="cpu", **OPTS)
    embed([tar], model=checkpoint, out=tmp_path / "local", device="cpu", **OPTS)
    local = pq.read_table(tmp_path / "local").to_pylist()
    remote = pq.read_table("tars/emb/part-00000.parquet", filesystem=s3_server.arrow_filesystem()).to_pylist()
    assert [r["path"] for r in remote] == [f"{bucket}/shards/shard-000.tar:sample{i:03d}" for i in range(len(good))]
    assert [r["embedding"] for r in remote] == [r["embedding"] for r in local]
    problems = [e for e in read_errors(f"{bucket}/emb") if e["shard"] is None]
    assert [e["path"] for e in problems] == [f"{bucket}/shards/shard-001.tar"]
    assert problems[0]["reason"] == "unreadable tar (ReadError: unexpected end of data)"  # as from local disk
    assert (summary.done, summary.errors) == (len(good), 1)


def test_retry_errors_in_a_bucket(s3_server: S3Server, photos, checkpoint: Path) -> None:
    root, good, _ = photos
    bucket = s3_server.make_bucket("retry")
    s3_server.upload(root / "good", f"{bucket}/photos/")
    fs = s3_server.filesystem()
    fs.pipe_file("retry/photos/late.jpg", b"not yet a photo")
    first = embed([f"{bucket}/photos/"], model=checkpoint, out=f"{bucket}/emb", device="cpu", **OPTS)
    assert [e["path"] for e in read_errors(f"{bucket}/emb")] == [f"{bucket}/photos/late.jpg"]
    fs.pipe_file("retry/photos/late.jpg", (root / "good" / "rgb.jpg").read_bytes())  # fixed in the bucket
    retried = embed(
        [f"{bucket}/photos/"], model=checkpoint, out=f"{bucket}/emb", retry_errors=True, device="cpu", **OPTS
    )
    assert (first.done, first.errors, retried.done, retried.errors) == (len(good), 1, 1, 0)
    assert read_errors(f"{bucket}/emb") == []
    rows = _rows(pq.read_table("retry/emb", filesystem=s3_server.arrow_filesystem()))
    assert len(rows) == len(good) + 1 and rows[f"{bucket}/photos/late.jpg"] == rows[f"{bucket}/photos/rgb.jpg"]
    manifest = json.loads(fs.cat_file("retry/emb/_manifest.json"))
    assert sum(s["rows"] for s in manifest["shards"]) == len(good) + 1  # recounted from the rewritten part
    assert sum(s["errors"] for s in manifest["shards"]) == 0


def test_missing_bucket_is_one_line(s3_server: S3Server, photos, checkpoint: Path, tmp_path: Path, capsys) -> None:
    with pytest.raises(InputError, match="no such file or folder"):
        embed(["s3://no-such-bucket/photos/"], model=checkpoint, out=tmp_path / "out", **OPTS)
    bucket = s3_server.make_bucket("in-only")
    s3_server.upload(photos[0] / "good", f"{bucket}/photos/")
    with pytest.raises(StorageError, match="the bucket 'no-such-bucket' does not exist"):
        embed([f"{bucket}/photos/"], model=checkpoint, out="s3://no-such-bucket/emb", **OPTS)
    code = main(["embed", f"{bucket}/photos/", "-m", str(checkpoint), "-o", "s3://no-such-bucket/emb"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and err.startswith("ornis: error: s3://no-such-bucket/emb:"), err


def test_claims_stay_on_posix_and_missing_backends_are_named() -> None:
    with pytest.raises(OutputFolderError, match="cannot share an output folder in object storage"):
        check_claims_possible("s3://bucket/emb", world_size=2)
    check_claims_possible("s3://bucket/emb", world_size=2, shard_ids=[0, 1])  # Ray actors with their shards
    check_claims_possible("/tmp/emb", world_size=2)  # a POSIX folder: claims by exclusive create
    with pytest.raises(StorageError, match=r"pip install 'ornis\[gcs\]'"):
        filesystem("gs://bucket/photos/")


def _cli(args: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "ornis", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _kill_midway(s3: S3Server, args: list[str], out: str, total: int) -> int:
    killed = _cli([*args, "-o", out])
    deadline = time.time() + 240
    parts: list[str] = []
    while not parts and time.time() < deadline and killed.poll() is None:
        parts = [k for k in s3.keys(out) if k.startswith("part-")]
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL
    done = len([k for k in s3.keys(out) if k.startswith("part-")])
    assert 1 <= done < total, done  # really killed mid-way
    return done


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["folder", "tars"])
def test_sigkill_midway_then_rerun_gives_the_same_rows(
    s3_server: S3Server, checkpoint: Path, tmp_path: Path, kind: str
) -> None:
    bucket = s3_server.make_bucket(f"kill-{kind}")
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(5)
    for i in range(45):
        Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(photos / f"p{i:03d}.jpg")
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff")
    names = sorted(p.name for p in photos.iterdir())
    if kind == "folder":
        s3_server.upload(photos, f"{bucket}/photos/")
        inputs, shards, broken = [f"{bucket}/photos/"], 16, f"{bucket}/photos/broken.jpg"
    else:
        for t in range(0, len(names), 3):  # 16 tars of 3 samples, each a shard
            with tarfile.open(tmp_path / f"s{t:03d}.tar", "w") as tf:
                for name in names[t : t + 3]:
                    tf.add(photos / name, arcname=name)
            s3_server.upload(tmp_path / f"s{t:03d}.tar", f"{bucket}/shards/s{t:03d}.tar")
        which = names.index("broken.jpg") // 3 * 3
        inputs, shards, broken = [f"{bucket}/shards/*.tar"], 16, f"{bucket}/shards/s{which:03d}.tar:broken"
    args = ["embed", *inputs, "-m", str(checkpoint), "--shard-size", "3", "--batch-size", "1", "--workers", "0"]
    args += ["--no-progress", "--device", "cpu"]

    whole = _cli([*args, "-o", f"{bucket}/whole"])
    assert whole.wait(timeout=300) == 0, whole.stderr.read()
    _kill_midway(s3_server, args, f"{bucket}/killed", shards)
    rerun = _cli([*args, "-o", f"{bucket}/killed"])
    assert rerun.wait(timeout=300) == 0, rerun.stderr.read()

    arrow = s3_server.arrow_filesystem()
    killed = _rows(ds.dataset(f"kill-{kind}/killed", format="parquet", filesystem=arrow).to_table())
    assert killed == _rows(ds.dataset(f"kill-{kind}/whole", format="parquet", filesystem=arrow).to_table())
    assert len(killed) == 45
    assert len([k for k in s3_server.keys(f"{bucket}/killed") if k.startswith("part-")]) == shards
    assert [e["path"] for e in read_errors(f"{bucket}/killed")] == [broken]


def test_a_batch_of_objects_is_fetched_together_and_reads_as_one_by_one(
    s3_server: S3Server, photos, checkpoint
) -> None:
    """The DataLoader's batched fetch (``__getitems__``) reads a batch's objects concurrently; what it returns equals
    reading them one by one, for good images, bad ones, an object over the size limit and one deleted since the
    plan was made."""
    from ornis.data.datasets import ShardDataset, read_plan_shard
    from ornis.data.decode import DecodeOptions
    from ornis.utils.storage import RemotePath

    root, good, bad = photos
    bucket = s3_server.make_bucket("batched")
    s3_server.upload(root, f"{bucket}/photos/")
    embed([f"{bucket}/photos/"], model=checkpoint, out=f"{bucket}/emb", device="cpu", **OPTS)
    plan = RemotePath(f"{bucket}/emb/_plan.parquet")
    indices = [(shard, i) for shard in range(4) for i in range(len(read_plan_shard(plan, shard)))]
    s3_server.filesystem().rm_file(f"batched/photos/{good[0]}")  # gone since the plan was made
    sizes = sorted((root / name).stat().st_size for name in good)
    to_tensor = lambda image: torch.from_numpy(np.array(image.convert("RGB").resize((8, 8))))  # noqa: E731
    options = DecodeOptions(max_bytes=sizes[len(sizes) // 2], max_pixels=MAX_PIXELS)  # half the good ones too large
    dataset = ShardDataset(plan, to_tensor, options)
    together = dataset.__getitems__(indices)
    one_by_one = [dataset[index] for index in indices]
    assert [(s.key, s.ok, s.reason, s.width, s.height) for s in together] == [
        (s.key, s.ok, s.reason, s.width, s.height) for s in one_by_one
    ]
    for a, b in zip(together, one_by_one):
        assert (a.pixels is None) == (b.pixels is None) and (a.pixels is None or torch.equal(a.pixels, b.pixels))
    reasons = [s.reason for s in together if not s.ok]
    assert sum("file not found" in r for r in reasons) == 1
    assert sum("too large" in r for r in reasons) >= len(good) // 2 - 1
    assert sum(s.ok for s in together) >= 2
    # the concurrent read itself: every object there, whole; the deleted one None
    urls = [f"{bucket}/photos/{name}" for name in good]
    fetched = read_many(urls, 1 << 30)
    assert fetched[0] is None and [len(b) for b in fetched[1:]] == [(root / n).stat().st_size for n in good[1:]]
