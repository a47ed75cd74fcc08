"""Every command, given bad arguments, ends in one line on stderr and exit code 1 or 2, never a traceback.

The rule (``ornis.cli.main``): argparse's ``ornis COMMAND: error: ...`` (exit 2) for a malformed command line, and
``ornis: error: ...`` for everything else: 2 for a value the library refuses (``ValueError`` / ``TypeError``), 1 for
a failure (``OrnisError``, ``OSError``, anything unexpected). ``--debug`` adds the traceback.

The table runs in-process (``main([...])``, stderr captured); a few cases also run as a real ``python -m ornis``
under a timeout, so a regression that hangs fails instead.
"""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ornis.assets import DEMO_MODEL
from ornis.cli.main import describe, main, os_error_message
from ornis.errors import EmbeddingsFormatError, OrnisError
from ornis.utils.fs import atomic_write_text

SUBPROCESS_TIMEOUT = 180  # seconds: importing torch on a busy 2-core machine is slow; a hang fails, never blocks


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of bad and good inputs every case can name: ``{work}`` in a case's arguments is this folder."""
    root = tmp_path_factory.mktemp("cli-errors")
    rng = np.random.default_rng(0)
    for c in ("circle", "square"):
        (root / "images" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(root / "images" / c / f"{i}.jpg")
    (root / "empty").mkdir()
    (root / "text.txt").write_text("not an image, not a checkpoint\n")
    (root / "a_file").write_text("a file where a folder should be\n")
    (root / "dir.json").mkdir()  # a folder where a file should be
    os.mkfifo(root / "fifo.out")  # a special file where a file should be: never replaced, never opened
    x = rng.normal(size=(24, 8)).astype(np.float32)
    labels = np.arange(24) % 3
    _write(root / "good.parquet", x, [f"/d/c{c}/{i}.jpg" for i, c in enumerate(labels)])
    _write(root / "flat.parquet", x, [f"/d/{i}.jpg" for i in range(24)])
    bad = x.copy()
    bad[[2, 7]] = np.nan
    _write(root / "nan.parquet", bad, [f"/d/c{c}/{i}.jpg" for i, c in enumerate(labels)])
    _write(root / "empty.parquet", x[:0], [])
    nulls = pa.array([None if i % 5 == 0 else f"c{c}" for i, c in enumerate(labels)])
    _write(root / "nulls.parquet", x, [f"/d/{i}.jpg" for i in range(24)], {"label": nulls})
    (root / "garbage.parquet").write_bytes(b"PAR1 not really\n")
    assert main(["index", "build", str(root / "good.parquet"), "-o", str(root / "index")]) == 0
    return root


def _write(path: Path, x: np.ndarray, paths: list[str], extra: dict | None = None) -> None:
    col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1), pa.float32()), x.shape[1])
    table = pa.table({"path": pa.array(paths, pa.string()), "embedding": col, **(extra or {})})
    pq.write_table(table.replace_schema_metadata({"ornis.model": DEMO_MODEL}), path)


def case(*argv: str, code: int, match: str | None = None) -> object:
    """One bad command line, the exit code it must end with and a piece of its error line."""
    return pytest.param(list(argv), code, match, id=" ".join(argv)[:90])


M, T, W = DEMO_MODEL, "vit_t16", "{work}"
CASES = [
    # models
    case("models", "info", "no_such_model_xyz", code=1, match="unknown model"),
    case("models", "frobnicate", code=2, match="invalid choice"),
    case("models", "download", "no_such_model_xyz", "--cache", f"{W}/cache", code=1, match="no_such_model_xyz"),
    case("models", "info", f"{W}/text.txt", code=1, match="not a checkpoint"),
    # convert
    case("convert", "sam2", f"{W}/text.txt", "-o", f"{W}/out.pt", code=1, match="text.txt"),
    case("convert", "dinov2", f"{W}/missing.pth", "-o", f"{W}/out.pt", code=1, match="missing.pth"),
    case("convert", "sam2", f"{W}/text.txt", code=2, match="-o/--output"),
    case("convert", "sam2", f"{W}/text.txt", "-o", f"{W}/out.pt", "--size", "0", code=2, match="--size"),
    # embed / classify
    case("embed", f"{W}/images", "-m", "no_such_model_xyz", "-o", f"{W}/emb1", code=1, match="no_such_model_xyz"),
    case("embed", f"{W}/images", "-m", M, "-o", f"{W}/emb2", "--batch-size", "-4", code=2, match="--batch-size"),
    case("embed", f"{W}/images", "-m", M, "-o", f"{W}/a_file", code=1, match="a_file"),
    case("embed", f"{W}/images", "-m", M, "-o", f"{W}/emb3", "--precision", "fp8", code=2, match="--precision"),
    case("embed", f"{W}/empty", "-m", M, "-o", f"{W}/emb4", code=1, match="no images"),
    case("classify", f"{W}/images", "-m", M, "-o", f"{W}/cls1", "-k", "0", code=2, match="-k/--top-k"),
    # export
    case("export", "no_such_model_xyz", "-o", f"{W}/x.onnx", code=1, match="no_such_model_xyz"),
    case("export", M, "-o", f"{W}/x.onnx", "--size", "0", "0", code=2, match="--size"),
    case("export", M, "-o", f"{W}/x.unknown", code=1, match="x.unknown"),
    case("export", M, "-o", f"{W}/dir.json", "--format", "onnx", code=1, match="dir.json"),
    case("export", M, "-o", f"{W}/fifo.out", "--format", "pts", code=1, match="fifo.out is a special file"),
    # train
    case("train", "classify", f"{W}/images", "--arch", T, "-o", f"{W}/t1", "--steps", "-5", code=2, match="--steps"),
    case(
        "train",
        "classify",
        f"{W}/images",
        "--arch",
        T,
        "-o",
        f"{W}/t2",
        "--steps",
        "1",
        "--model-config",
        "[1]",
        code=2,
        match="--model-config",
    ),
    case("train", "classify", f"{W}/empty", "--arch", T, "-o", f"{W}/t3", "--steps", "1", code=1, match="empty"),
    case("train", "classify", f"{W}/images", "-o", f"{W}/t4", "--steps", "1", code=2, match="--weights"),
    case("train", "mim", f"{W}/missing", "--arch", "hiera_abswin_tiny", "-o", f"{W}/t5", "--steps", "1", code=1),
    *(
        case(
            "train",
            "mim",
            f"{W}/images",
            "--arch",
            T,
            "-o",
            f"{W}/t5r",
            "--steps",
            "1",
            "--model-config",
            f'{{"drop_path_rate": {rate}}}',
            code=2,
            match="drop_path_rate must be in [0, 1)",
        )
        for rate in (-1, 1.5)
    ),
    case(
        "train",
        "mim",
        f"{W}/images",
        "--arch",
        "no_such_arch",
        "-o",
        f"{W}/t6",
        "--steps",
        "1",
        code=1,
        match="unknown",
    ),
    case("train", "mim", f"{W}/images", "--arch", "hiera_abswin_tiny", "-o", f"{W}/t7", "--steps", "x", code=2),
    case("train", "dino-v2", f"{W}/images", "--weights", "no_such_model_xyz", "-o", f"{W}/t8", "--steps", "1", code=1),
    case("train", "dino-v2", f"{W}/images", "--arch", T, "-o", f"{W}/a_file", "--steps", "1", code=1, match="a_file"),
    case(
        "train",
        "dino-v2",
        f"{W}/images",
        "--arch",
        T,
        "-o",
        f"{W}/t9",
        "--steps",
        "1",
        "--batch-size",
        "0",
        code=2,
        match="--batch-size",
    ),
    # eval
    case("eval", "knn", f"{W}/flat.parquet", code=1, match="at least 2 classes"),
    case("eval", "knn", f"{W}/good.parquet", "-k", "0", code=2, match="argument -k"),
    case("eval", "knn", f"{W}/good.parquet", "--temperature", "0", code=2, match="--temperature"),
    case("eval", "knn", f"{W}/nan.parquet", code=1, match="2 of 24 rows have non-finite"),
    case("eval", "knn", f"{W}/garbage.parquet", code=1, match="not a Parquet file"),
    case("eval", "knn", f"{W}/fifo.out", code=1, match="fifo.out: a special file (device, FIFO or socket), not a"),
    case("index", "build", f"{W}/fifo.out", "-o", f"{W}/idx3", code=1, match="a special file"),
    case("eval", "knn", f"{W}/good.parquet", "--json", f"{W}/dir.json", code=1, match="Is a directory"),
    case("eval", "knn", f"{W}/good.parquet", "--json", f"{W}/fifo.out", code=1, match="is a special file"),
    case("eval", "knn", f"{W}/good.parquet", "--json", f"{W}/a_file/x.json", code=1, match="Not a directory"),
    case("eval", "linear", f"{W}/empty.parquet", code=1, match="no rows"),
    case("eval", "linear", f"{W}/nulls.parquet", "--label-column", "label", code=1, match="no label in column"),
    case("eval", "linear", f"{W}/good.parquet", "--held-out", "1.5", code=2, match="--held-out"),
    case("eval", "linear", f"{W}/good.parquet", "--epochs", "0", code=2, match="--epochs"),
    # index
    case("index", "build", f"{W}/nan.parquet", "-o", f"{W}/idx1", code=1, match="--drop-non-finite"),
    case("index", "build", f"{W}/good.parquet", "-o", f"{W}/a_file", code=1, match="Not a directory"),
    case("index", "build", f"{W}/missing.parquet", "-o", f"{W}/idx2", code=1, match="no such embeddings"),
    case("index", "search", f"{W}/index", f"{W}/text.txt", code=1, match="not an image"),
    case("index", "search", f"{W}/index", f"{W}/empty", code=1, match="a folder"),
    case("index", "search", f"{W}/index", "3", "-k", "0", code=2, match="argument -k"),
    case("index", "search", f"{W}/missing", "3", code=1, match="not an index folder"),
    case("index", "duplicates", f"{W}/index", "--threshold", "2", code=2, match="--threshold"),
    case("index", "duplicates", f"{W}/index", "--threshold", "nan", code=2, match="--threshold"),
    case("index", "duplicates", f"{W}/index", "--csv", f"{W}/dir.json", code=1, match="Is a directory"),
    case("index", "duplicates", f"{W}/index", "--csv", f"{W}/fifo.out", code=1, match="is a special file"),
    # demo
    case("demo", "-o", f"{W}/a_file", code=1, match="Not a directory"),
    case("demo", "--held-out", "-5", code=2, match="--held-out"),
    case("demo", "--held-out", "many", code=2, match="--held-out"),
]


def check_one_line_error(code: int, err: str, expected: int, match: str | None) -> None:
    assert "Traceback" not in err, err
    assert code == expected in (1, 2), f"exit code {code}, expected {expected}; stderr:\n{err}"
    last = err.strip().splitlines()[-1] if err.strip() else ""
    assert last.startswith("ornis: error:") or (last.startswith("ornis ") and ": error:" in last), err
    if match is not None:
        assert match in last, last


@pytest.mark.parametrize(("argv", "code", "match"), CASES)
def test_bad_command_lines_end_in_one_line(
    argv: list[str],
    code: int,
    match: str | None,
    work: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ORNIS_OFFLINE", "1")
    monkeypatch.setenv("ORNIS_CACHE", str(work / "cache"))
    monkeypatch.chdir(work)  # `ornis demo` without -o writes ./ornis-demo
    capsys.readouterr()
    got = main([a.replace(W, str(work)) for a in argv])
    check_one_line_error(got, capsys.readouterr().err, code, match)


SUBPROCESS_CASES = [
    case("eval", "knn", f"{W}/good.parquet", "-k", "-3", code=2, match="argument -k"),
    case("eval", "knn", f"{W}/nan.parquet", code=1, match="non-finite"),
    case("index", "search", f"{W}/index", f"{W}/text.txt", code=1, match="not an image"),
    case("demo", "-o", f"{W}/a_file", code=1, match="Not a directory"),
    case("models", "info", "no_such_model_xyz", code=1, match="unknown"),
]


def run_ornis(argv: list[str], cwd: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "ORNIS_OFFLINE": "1", "ORNIS_CACHE": str(cwd / "cache"), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "ornis", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
    )


@pytest.mark.parametrize(("argv", "code", "match"), SUBPROCESS_CASES)
def test_bad_command_lines_in_a_real_process(argv: list[str], code: int, match: str | None, work: Path) -> None:
    done = run_ornis([a.replace(W, str(work)) for a in argv], work)
    check_one_line_error(done.returncode, done.stderr, code, match)


def test_debug_shows_the_traceback_anywhere_on_the_command_line(work: Path) -> None:
    argv = ["eval", "knn", str(work / "nan.parquet")]
    for debug_argv, env in (
        (["--debug", *argv], None),
        ([*argv, "--debug"], None),
        (argv, {"ORNIS_DEBUG": "1"}),
    ):
        done = run_ornis(debug_argv, work, env)
        assert done.returncode == 1
        assert "Traceback" in done.stderr and "EmbeddingsFormatError" in done.stderr, done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("ornis: error: ")


def test_exit_codes_and_messages_follow_the_rule() -> None:
    assert describe(EmbeddingsFormatError("a.parquet: no rows")) == (1, "a.parquet: no rows")
    assert describe(ValueError("k must be a positive integer, got 0")) == (2, "k must be a positive integer, got 0")
    assert describe(TypeError("temperature must be a number, got str"))[0] == 2
    code, text = describe(PermissionError(errno.EACCES, "Permission denied", "/ro/out.json"))
    assert (code, text) == (1, "/ro/out.json: Permission denied")
    assert describe(OSError(errno.ENOSPC, "No space left on device")) == (1, "No space left on device")
    assert os_error_message(OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b")) == (
        "a -> b: Invalid cross-device link"
    )
    code, text = describe(RuntimeError("boom\nsecond line"))
    assert code == 1 and text == "unexpected RuntimeError: boom; second line (run again with --debug for the traceback)"
    code, text = describe(OrnisError("x" * 5000))
    assert code == 1 and len(text) < 2100 and text.endswith("(3000 more characters; --debug shows all)")
    assert describe(OrnisError("one\ntwo\n\nthree"))[1] == "one; two; three"


def test_failures_inside_a_command_are_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], work: Path
) -> None:
    """What a command raises, beyond what the table provokes: a full disk, an interrupt, a bug."""
    import ornis.cli.evaluate as evaluate

    def raising(error: BaseException):  # noqa: ANN202
        def run(*args: object, **kwargs: object) -> None:
            raise error

        return run

    argv = ["eval", "knn", str(work / "good.parquet"), "--json", str(work / "report.json")]
    for error, code, text in (
        (OSError(errno.ENOSPC, "No space left on device", str(work / "report.json")), 1, "report.json: No space left"),
        (KeyboardInterrupt(), 130, "ornis: error: interrupted"),
        (ZeroDivisionError("division by zero"), 1, "unexpected ZeroDivisionError: division by zero"),
        (ValueError("k must be a positive integer, got 0"), 2, "ornis: error: k must be a positive integer, got 0"),
    ):
        monkeypatch.setattr(evaluate, "atomic_write_json", raising(error))
        assert main(argv) == code
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("ornis: error:")
        assert text in err.strip().splitlines()[-1]
    assert not (work / "report.json").exists()
    monkeypatch.setattr(evaluate, "atomic_write_json", raising(BrokenPipeError(errno.EPIPE, "Broken pipe")))
    assert main(argv) == 141  # `ornis ... | head`: the reader left; nothing to report
    assert capsys.readouterr().err == ""


def test_usage_errors_keep_argparse_messages_and_help_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", "knn"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("ornis eval knn: error:")
    assert main(["--help"]) == 0
    assert "COMMAND" in capsys.readouterr().out
    assert main([]) == 2
    assert main(["eval", "knn", "--help"]) == 0
    assert "--drop-non-finite" in capsys.readouterr().out


def test_json_report_checked_before_the_work(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An unwritable --json fails before evaluating: nothing printed, nothing half-done."""
    assert main(["eval", "linear", str(work / "good.parquet"), "--json", str(work / "dir.json")]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.strip() == f"ornis: error: {work / 'dir.json'}: Is a directory"
    assert main(["eval", "knn", str(work / "good.parquet"), "--json", str(work / "new" / "knn.json")]) == 0
    assert json.loads((work / "new" / "knn.json").read_text())["count"] == 24


@pytest.mark.parametrize(
    ("code", "reason"), [(errno.EACCES, "Permission denied"), (errno.EROFS, "Read-only file system")]
)
def test_an_unwritable_output_folder_is_refused_before_the_work(
    code: int, reason: str, work: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Root writes anywhere, so the tests cannot chmod a folder read-only: the write probe is made to fail as it
    does for a normal user in a read-only folder, or for anyone on a read-only file system."""
    import ornis.cli.common as common

    (work / "ro").mkdir(exist_ok=True)

    def refuse(*args: object, dir: str | None = None, **kwargs: object) -> None:
        raise OSError(code, os.strerror(code), os.path.join(str(dir), "probe"))

    monkeypatch.setattr(common.tempfile, "mkstemp", refuse)
    for argv in (
        ["eval", "knn", str(work / "good.parquet"), "--json", str(work / "ro" / "knn.json")],
        ["index", "build", str(work / "good.parquet"), "-o", str(work / "ro" / "idx")],
        ["index", "duplicates", str(work / "index"), "--csv", str(work / "ro" / "d.csv")],
        ["demo", "-o", str(work / "ro" / "demo")],
    ):
        assert main(argv) == 1
        captured = capsys.readouterr()
        assert captured.err.strip() == f"ornis: error: {work / 'ro'}: {reason}" and captured.out == ""
    assert list((work / "ro").iterdir()) == []


def test_a_special_file_given_as_output_is_left_as_it_was(work: Path) -> None:
    """``-o /dev/null`` once replaced the device node with a regular file (the atomic rename); a FIFO stands in."""
    fifo = work / "fifo.out"
    for argv in (
        ["export", DEMO_MODEL, "-o", str(fifo), "--format", "pts"],
        ["eval", "knn", str(work / "good.parquet"), "--json", str(fifo)],
    ):
        assert main(argv) == 1
        assert stat.S_ISFIFO(fifo.stat().st_mode)
    assert [p.name for p in work.iterdir() if p.name.startswith(".fifo.out")] == []  # no temporary file left


def test_atomic_path_refuses_special_files_before_writing(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    with pytest.raises(OrnisError, match=r"pipe is a special file \(device, FIFO or socket\), not a regular file"):
        atomic_write_text(fifo, "x")
    (tmp_path / "d").mkdir()
    with pytest.raises(OrnisError, match="d is a folder, not a regular file"):
        atomic_write_text(tmp_path / "d", "x")
    (tmp_path / "link").symlink_to(fifo)
    with pytest.raises(OrnisError, match="link is a special file"):
        atomic_write_text(tmp_path / "link", "x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "link", "pipe"]
    assert atomic_write_text(tmp_path / "new.txt", "x").read_text() == "x"


def test_an_error_raised_in_a_dataloader_worker_is_its_own_message() -> None:
    from torch.utils.data import DataLoader, Dataset

    from ornis.data.sources import DatasetError

    class Unreadable(Dataset):
        def __len__(self) -> int:
            return 1

        def __getitem__(self, index: int) -> int:
            raise DatasetError("no readable image in the training data")

    with pytest.raises(DatasetError) as caught:
        next(iter(DataLoader(Unreadable(), num_workers=1)))
    assert "Traceback" in str(caught.value)  # torch's wrapping, which the line must not show
    assert describe(caught.value) == (1, "no readable image in the training data")
    wrapped = ValueError(
        "Caught ValueError in DataLoader worker process 0.\nOriginal Traceback (most recent call "
        'last):\n  File "x.py", line 1, in f\nValueError: k must be positive\n'
    )
    assert describe(wrapped) == (2, "k must be positive")
