"""Bad and odd inputs to ``ornis embed`` / ``ornis classify``, each through the command line in a subprocess (as a
careless or malicious user would type it): every one ends in a one-line error with the right exit code or in a
listed skip, never in a traceback or a hang, and leaves no temporary file in the output folder.

Each subprocess runs under a 30 s timeout (a hang fails, it does not hang the suite) and a 4 GiB address-space
limit (a file read without end fails, it does not eat the machine's memory)."""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from support.images import encode, random_rgb

import ornis
from ornis.data.decode import DecodeOptions
from ornis.inference.batch import BatchJob, OutputFolderError, make_job, prepare_output, read_errors
from ornis.inference.batch.layout import CLAIMS_DIR
from ornis.inference.batch.lease import AttemptLease

pytestmark = pytest.mark.usefixtures("one_thread")

TIMEOUT = 30
FAST = ["--workers", "0", "--batch-size", "2", "--no-progress", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    net = ornis.build_model("vit_t16", num_classes=3, size=32)
    return ornis.save_model(net, tmp_path_factory.mktemp("ckpt") / "vit_t16_tiny.pt", class_to_idx={"a": 0, "b": 1})


def _photos(folder: Path, n: int = 3, prefix: str = "p") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"{prefix}{i}.jpg"
        path.write_bytes(encode(random_rgb(20, 24, seed=i), "JPEG"))
        paths.append(path)
    return paths


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def _ornis(*args: str | os.PathLike, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ornis", *map(os.fspath, args)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=env,
        cwd=cwd,
        preexec_fn=_limit_memory,
    )


def _no_temporaries(out: Path) -> None:
    if out.exists():
        left = [p for p in out.rglob("*") if ".tmp" in p.name]
        assert not left, left


def _fails(result: subprocess.CompletedProcess, code: int, *words: str) -> str:
    """The one error line of a command that failed with ``code``; it contains every one of ``words``."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ": error: " in ln]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(("ornis: error: ", "ornis embed: error: ", "ornis classify: error: ")), lines[0]
    for word in words:
        assert word in lines[0], (word, lines[0])
    return lines[0]


def _succeeds(result: subprocess.CompletedProcess, out: Path) -> dict[str, str]:
    """The errors file of a command that succeeded, as path -> reason."""
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    _no_temporaries(out)
    return {e["path"]: e["reason"] for e in read_errors(out)}


# -- the bad ones: hangs, unbounded reads, silent no-ops --------------------------------------------------------
def test_fifo_named_like_an_image_is_listed_not_read(checkpoint: Path, tmp_path: Path) -> None:
    good = _photos(tmp_path / "in")
    os.mkfifo(tmp_path / "in" / "x.jpg")
    (tmp_path / "in" / "folder.jpg").mkdir()  # a folder named like an image is walked as a folder
    _photos(tmp_path / "in" / "folder.jpg", 1, prefix="inner")
    out = tmp_path / "out"
    errors = _succeeds(_ornis("embed", tmp_path / "in", "-m", checkpoint, "-o", out, *FAST), out)
    assert errors == {str(tmp_path / "in" / "x.jpg"): "not a regular file (a FIFO); skipped without reading"}
    assert pq.read_table(out).num_rows == len(good) + 1


def test_symlink_to_dev_urandom_is_refused_unread(checkpoint: Path, tmp_path: Path) -> None:
    _photos(tmp_path / "in")
    os.symlink("/dev/urandom", tmp_path / "in" / "r.jpg")
    out = tmp_path / "out"
    errors = _succeeds(_ornis("embed", tmp_path / "in", "-m", checkpoint, "-o", out, *FAST), out)
    assert errors == {
        str(tmp_path / "in" / "r.jpg"): "not a regular file (a character device); skipped without reading"
    }


def test_file_over_the_byte_limit_is_listed_unread(checkpoint: Path, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "in")
    big = tmp_path / "in" / "big.png"
    big.write_bytes(b"\x89PNG" + b"\x00" * 5000)
    out = tmp_path / "out"
    args = ("embed", tmp_path / "in", "-m", checkpoint, "-o", out, "--max-bytes", "4000", *FAST)
    errors = _succeeds(_ornis(*args), out)
    assert errors == {str(big): "file too large (5004 bytes, limit 4000)"}
    assert pq.read_table(out).num_rows == len(photos)


@pytest.mark.parametrize(
    ("task", "option", "value", "says"),
    [
        ("embed", "--batch-size", "-4", "must be at least 1"),
        ("embed", "--batch-size", "0", "must be at least 1"),
        ("embed", "--max-pixels", "0", "must be at least 1"),
        ("embed", "--max-bytes", "0", "must be at least 1"),
        ("embed", "--workers", "-1", "must be at least 0"),
        ("embed", "--shard-size", "0", "must be at least 1"),
        ("classify", "-k", "0", "must be at least 1"),
        ("classify", "-k", "-3", "must be at least 1"),
        ("embed", "--precision", "fp8", "invalid choice"),
        ("embed", "--device", "tpu:7", "is not a device"),
    ],
)
def test_out_of_range_options_are_usage_errors(checkpoint: Path, tmp_path: Path, task, option, value, says) -> None:
    _photos(tmp_path / "in")
    out = tmp_path / "out"
    _fails(_ornis(task, tmp_path / "in", "-m", checkpoint, "-o", out, option, value), 2, option, value, says)
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_without_a_gpu_is_a_one_line_failure(checkpoint: Path, tmp_path: Path) -> None:
    _photos(tmp_path / "in")
    out = tmp_path / "out"
    _fails(_ornis("embed", tmp_path / "in", "-m", checkpoint, "-o", out, "--device", "cuda"), 1, "no CUDA GPU")
    assert not out.exists()


# -- the poor ones: inputs that name nothing usable --------------------------------------------------------------
def test_empty_folder_says_no_images_were_found(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    _fails(_ornis("embed", tmp_path / "empty", "-m", checkpoint, "-o", out), 1, "no images found", "empty")
    assert not out.exists()


def test_csv_without_a_path_column_names_its_columns(checkpoint: Path, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "in")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        csv.writer(f).writerows([["label", "where"], *[["bird", str(p)] for p in photos]])
    out = tmp_path / "out"
    _fails(_ornis("embed", tmp_path / "list.csv", "-m", checkpoint, "-o", out), 1, "'label'", "'where'", "path")
    assert not out.exists()


def test_garbage_parquet_list_is_a_one_line_error(checkpoint: Path, tmp_path: Path) -> None:
    (tmp_path / "list.parquet").write_bytes(b"these bytes are not Parquet\n" * 10)
    out = tmp_path / "out"
    _fails(_ornis("embed", tmp_path / "list.parquet", "-m", checkpoint, "-o", out), 1, "not a Parquet file list")
    assert not out.exists()


def test_output_that_is_a_file_is_a_one_line_error(checkpoint: Path, tmp_path: Path) -> None:
    _photos(tmp_path / "in")
    (tmp_path / "out").write_text("a file")
    _fails(_ornis("embed", tmp_path / "in", "-m", checkpoint, "-o", tmp_path / "out"), 1, "not a folder")


def test_tar_cut_at_a_header_boundary_reports_the_truncation(checkpoint: Path, tmp_path: Path) -> None:
    data = [encode(random_rgb(20, 24, seed=i), "PNG") for i in range(6)]
    buf = io.BytesIO()
    ends = []
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i, d in enumerate(data):
            info = tarfile.TarInfo(f"s{i}.png")
            info.size = len(d)
            tf.addfile(info, io.BytesIO(d))
            ends.append(buf.tell())
    (tmp_path / "cut.tar").write_bytes(buf.getvalue()[: ends[3]])  # four whole members, then nothing
    out = tmp_path / "out"
    result = _ornis("embed", tmp_path / "cut.tar", "-m", checkpoint, "-o", out, *FAST)
    errors = _succeeds(result, out)
    assert list(errors) == [str(tmp_path / "cut.tar")]
    assert errors[str(tmp_path / "cut.tar")].startswith("truncated tar")
    assert "(4 samples before it are used)" in errors[str(tmp_path / "cut.tar")]
    assert pq.read_table(out).num_rows == 4
    assert " 0 errors" not in result.stderr and "1 errors" in result.stderr


def test_file_list_naming_a_folder_lists_it(checkpoint: Path, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "in")
    (tmp_path / "dir.jpg").mkdir()
    (tmp_path / "list.txt").write_text("\n".join([str(photos[0]), "dir.jpg"]) + "\n")
    out = tmp_path / "out"
    errors = _succeeds(_ornis("embed", tmp_path / "list.txt", "-m", checkpoint, "-o", out, *FAST), out)
    assert errors == {str(tmp_path / "dir.jpg"): "not a regular file (a folder); skipped without reading"}


def test_name_that_is_not_utf8_is_kept(checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "in"
    _photos(folder, 2)
    good = os.path.join(os.fsencode(folder), b"bad\xffbyte.jpg")
    broken = os.path.join(os.fsencode(folder), b"broken\xfe.jpg")
    with open(good, "wb") as f:
        f.write(encode(random_rgb(20, 24, seed=9), "JPEG"))
    with open(broken, "wb") as f:
        f.write(b"not an image")
    out = tmp_path / "out"
    errors = _succeeds(_ornis("embed", folder, "-m", checkpoint, "-o", out, *FAST), out)
    # The errors file keeps the name as a surrogate escape: it maps back to the file's own bytes
    assert [os.fsencode(p) for p in errors] == [broken]
    assert "not an image" in next(iter(errors.values()))
    paths = pq.read_table(out).column("path").to_pylist()
    assert len(paths) == 3 and f"{folder}/bad\\xffbyte.jpg" in paths  # Parquet strings are UTF-8: \xNN shown


# -- output folders ----------------------------------------------------------------------------------------------
def test_failed_run_does_not_block_its_folder(checkpoint: Path, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "in")
    (tmp_path / "broken.pt").write_text("not a checkpoint")
    out = tmp_path / "out"
    _fails(_ornis("embed", tmp_path / "in", "-m", tmp_path / "broken.pt", "-o", out, *FAST), 1, "broken.pt")
    _no_temporaries(out)
    _succeeds(_ornis("embed", tmp_path / "in", "-m", checkpoint, "-o", out, *FAST), out)
    assert pq.read_table(out).num_rows == len(photos)


def test_folder_spellings_are_one_job_and_one_file_one_row(checkpoint: Path, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "data")
    _succeeds(_ornis("embed", "./data/", "-m", checkpoint, "-o", "out", *FAST, cwd=tmp_path), tmp_path / "out")
    again = _ornis("embed", "data", "-m", checkpoint, "-o", "out", *FAST, cwd=tmp_path)
    _succeeds(again, tmp_path / "out")
    assert f"0 images done, {len(photos)} skipped" in again.stderr
    # The same file named twice (a folder and one of its files, spelt differently) is one row
    twice = _ornis("embed", "data", "./data//p0.jpg", "-m", checkpoint, "-o", "out2", *FAST, cwd=tmp_path)
    _succeeds(twice, tmp_path / "out2")
    assert sorted(pq.read_table(tmp_path / "out2").column("path").to_pylist()) == [f"data/p{i}.jpg" for i in range(3)]


@pytest.mark.slow
def test_two_runs_into_one_folder_share_the_work(checkpoint: Path, tmp_path: Path) -> None:
    photos = _photos(tmp_path / "in", 120)
    out = tmp_path / "out"
    args = [sys.executable, "-m", "ornis", "embed", tmp_path / "in", "-m", checkpoint, "-o", out]
    args += ["--shard-size", "2", "--batch-size", "1", "--workers", "0", "--no-progress", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    try:
        results = [(p.wait(timeout=120), p.stderr.read()) for p in runs]
    finally:
        for p in runs:
            p.kill()
    for code, stderr in results:
        assert code == 0 and "Traceback" not in stderr, stderr
    paths = pq.read_table(out).column("path").to_pylist()
    assert sorted(paths) == sorted(str(p) for p in photos)  # every image exactly once
    _no_temporaries(out)


# -- the same checks on the library, without a subprocess -------------------------------------------------------
@pytest.mark.parametrize(
    ("option", "value"),
    [("batch_size", -4), ("batch_size", 0), ("num_workers", -1), ("shard_size", 0), ("top_k", 0), ("top_k", -3)],
)
def test_job_refuses_out_of_range_values_by_name(option: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"{option} must be an integer of at least"):
        BatchJob(inputs=("a",), out="o", model="m", **{option: value})


def test_job_refuses_bad_precision_device_and_pixel_limit() -> None:
    with pytest.raises(ValueError, match="precision must be one of"):
        BatchJob(inputs=("a",), out="o", model="m", precision="fp8")
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N"):
        BatchJob(inputs=("a",), out="o", model="m", device="tpu:7")
    with pytest.raises(ValueError, match="max_pixels must be a positive integer, got 0"):
        make_job(["a"], model="m", out="o", max_pixels=0)
    with pytest.raises(ValueError, match="max_bytes must be a positive integer"):
        DecodeOptions(max_bytes=-1)


def test_second_run_joins_a_live_run_and_refuses_another_job(checkpoint: Path, tmp_path: Path) -> None:
    _photos(tmp_path / "in", 4)
    job = make_job([tmp_path / "in"], model=checkpoint, out=tmp_path / "out", shard_size=1, device="cpu")
    first = prepare_output(job)  # a run in progress: it holds its lease and has claimed shard 0
    attempt = json.loads((tmp_path / "out" / "_manifest.json").read_text())["attempt"]
    claim = tmp_path / "out" / CLAIMS_DIR / attempt / "00000"
    claim.write_text("rank 0")
    try:
        second = prepare_output(job)
        try:
            assert claim.exists()  # not reset under the first run's feet: the second shares its claims
            assert json.loads((tmp_path / "out" / "_manifest.json").read_text())["attempt"] == attempt
        finally:
            second.release()
        other = make_job([tmp_path / "in"], model=checkpoint, out=tmp_path / "out", shard_size=2, device="cpu")
        with pytest.raises(OutputFolderError, match=rf"another run \(pid {os.getpid()} on host .*shard_size"):
            prepare_output(other)
    finally:
        first.release()
    # Once nobody runs there, a new run starts a new attempt, which frees the dead run's claims
    third = prepare_output(job)
    third.release()
    assert not claim.exists()


def test_lease_is_dropped_by_a_killed_process(tmp_path: Path) -> None:
    from ornis.inference.batch.lease import is_live

    (tmp_path / "attempt").mkdir()
    code = "import sys, time; from pathlib import Path; from ornis.inference.batch.lease import AttemptLease; "
    code += "AttemptLease(Path(sys.argv[1])); print('held', flush=True); time.sleep(60)"
    holder = subprocess.Popen([sys.executable, "-c", code, tmp_path / "attempt"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert is_live(tmp_path / "attempt")
        with AttemptLease(tmp_path / "attempt"):
            pass  # shared: a second holder does not wait
    finally:
        holder.kill()
        holder.wait(timeout=TIMEOUT)
    assert not is_live(tmp_path / "attempt")
