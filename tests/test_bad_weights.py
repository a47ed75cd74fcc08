"""Bad input to the weights, conversion and export commands, through the real command line in a subprocess
(``python -m ornis ...``, each under a 60 s timeout so that a hang fails instead of stalling the suite): every
mistake ends with exit code 1 (a failure) or 2 (a usage error), one ``ornis: error:`` line on stderr and no
traceback; and what is written honours the umask."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from support.convert import junk_sources, tiny_hub_state

from ornis.assets import DEMO_MODEL, DEMO_MODEL_FILE

PUBLISHED = "hieradet_small_sam2_1"  # any published name that is not in the test's empty cache


@pytest.fixture()
def env(tmp_path: Path) -> dict[str, str]:
    """The environment of a user with an empty cache under tmp_path, network allowed (no test reaches it: each
    fails before, or talks to 127.0.0.1)."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("ORNIS_")}
    out.update(ORNIS_CACHE=str(tmp_path / "cache"), ORNIS_OFFLINE="0")
    return out


def ornis(*args: str, env: dict[str, str], cwd: Path, umask: int = -1) -> tuple[int, str, str, float]:
    """Run ``python -m ornis ARGS``; returns (exit code, stdout, stderr, seconds)."""
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "ornis", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        umask=umask,
    )
    return done.returncode, done.stdout, done.stderr, time.monotonic() - t0


def assert_failure(result: tuple[int, str, str, float], *, contains: str) -> str:
    """Exit code 1 and exactly one line on stderr, ``ornis: error: ...`` containing ``contains``."""
    code, _, err, _ = result
    assert "Traceback" not in err, err
    assert code == 1, err
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith("ornis: error: "), err
    assert contains in err, err
    return err


def assert_usage_error(result: tuple[int, str, str, float], *, contains: str) -> str:
    """Exit code 2, argparse's usage, and one error line naming the argument."""
    code, _, err, _ = result
    assert "Traceback" not in err, err
    assert code == 2, err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and errors[0].startswith("ornis ") and contains in errors[0], err
    return err


def test_info_on_the_shipped_model(env, tmp_path):
    code, out, err, _ = ornis("models", "info", DEMO_MODEL, env=env, cwd=tmp_path)
    assert code == 0, err
    assert "parameters (M)  0.82" in out and "none: ships with ornis" in out and "huggingface" not in out


def test_info_on_a_misspelt_published_name(env, tmp_path):
    err = assert_failure(ornis("models", "info", "hieradet_small_sam2", env=env, cwd=tmp_path), contains="did you mean")
    assert "'hieradet_small_sam2_1'" in err


def test_malformed_base_url_fails_at_once(env, tmp_path):
    result = ornis(
        "models", "download", PUBLISHED, "--no-progress", "--base-url", "localhost:8000", env=env, cwd=tmp_path
    )
    url = "localhost:8000/birder-project/hieradet_small_sam2_1/resolve/main/hieradet_small_sam2_1.pt"
    assert_failure(result, contains=f"'{url}' is not a valid download URL")
    assert not (tmp_path / "cache" / "weights").exists()


def test_refused_connection_fails_fast(env, tmp_path):
    """Before: six attempts with 1, 2, 4, 8, 16 s between them (~31 s) for a port nobody listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = ornis(
        "models",
        "download",
        PUBLISHED,
        "--no-progress",
        "--base-url",
        f"http://127.0.0.1:{port}",
        env=env,
        cwd=tmp_path,
    )
    assert_failure(result, contains="Connection refused); gave up after 2 attempts")
    assert result[3] < 20  # interpreter start-up and imports included


def test_cache_that_is_a_file(env, tmp_path):
    blocker = tmp_path / "cache.txt"
    blocker.write_text("not a folder")
    env = {**env, "ORNIS_CACHE": str(blocker)}
    for offline in ("0", "1"):
        result = ornis(
            "models", "download", PUBLISHED, "--no-progress", env={**env, "ORNIS_OFFLINE": offline}, cwd=tmp_path
        )
        assert_failure(result, contains=f"ORNIS_CACHE={blocker}: the weights cache cannot be used: {blocker} is a file")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache(env, tmp_path):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    try:
        result = ornis(
            "models", "download", PUBLISHED, "--no-progress", env={**env, "ORNIS_CACHE": str(root)}, cwd=tmp_path
        )
    finally:
        root.chmod(0o755)
    assert_failure(result, contains=f"ORNIS_CACHE={root}: the weights cache cannot be used")


@pytest.mark.parametrize("source", ["sam2", "dinov2"])
def test_convert_a_text_file(env, tmp_path, source):
    """Before: `IndexError: pop from empty list` / `KeyError: 101` from the unpickler, with a traceback."""
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    result = ornis("convert", source, str(text), "-o", str(tmp_path / "x.pt"), env=env, cwd=tmp_path)
    assert_failure(result, contains=f"{text}: not a torch.save file")
    assert not (tmp_path / "x.pt").exists()


@pytest.mark.parametrize("source", ["sam2", "dinov2"])
def test_convert_a_partial_state_dict(env, tmp_path, source):
    """The keys a converter looks at first are there, the rest are not (before: `ValueError: max() arg is an empty
    sequence` with a traceback)."""

    src = junk_sources(tmp_path)[f"partial-{source}"]
    result = ornis("convert", source, str(src), "-o", "x.pt", env=env, cwd=tmp_path)
    assert_failure(result, contains=f"{src}: not a {'SAM 2' if source == 'sam2' else 'DINOv2'} checkpoint")


def test_convert_into_a_folder(env, tmp_path):
    (tmp_path / "out").mkdir()
    src = tmp_path / "notes.txt"
    src.write_text("hello\n")
    result = ornis("convert", "sam2", str(src), "-o", str(tmp_path / "out"), env=env, cwd=tmp_path)
    assert_failure(result, contains=str(tmp_path / "out"))


def test_export_size_not_a_multiple_of_the_stride(env, tmp_path):
    result = ornis("export", str(DEMO_MODEL_FILE), "--size", "50", "50", "-o", "a.pts", env=env, cwd=tmp_path)
    assert_failure(result, contains="vit_t16: export size (50, 50) is not two positive multiples of 8")
    assert os.listdir(tmp_path) == []


def test_export_size_zero(env, tmp_path):
    result = ornis("export", str(DEMO_MODEL_FILE), "--size", "0", "0", "-o", "a.pts", env=env, cwd=tmp_path)
    assert_usage_error(result, contains="argument --size: 0 must be at least 1")


def test_export_into_a_folder(env, tmp_path):
    (tmp_path / "a.pts").mkdir()
    result = ornis("export", str(DEMO_MODEL_FILE), "-o", "a.pts", env=env, cwd=tmp_path)
    assert_failure(result, contains="a.pts is a folder; the output names the file to write, e.g. a.pts/model.pts")
    assert os.listdir(tmp_path / "a.pts") == []


def test_export_says_it_once_and_writes_0644(env, tmp_path):
    code, out, err, _ = ornis("export", str(DEMO_MODEL_FILE), "-o", "a.pts", env=env, cwd=tmp_path, umask=0o022)
    assert code == 0, err
    assert (out + err).count("exported embedding (embedding) as pts to a.pts") == 1
    assert (tmp_path / "a.pts").stat().st_mode & 0o777 == 0o644
    assert sorted(os.listdir(tmp_path)) == ["a.pts"]


def test_converted_file_is_0644(env, tmp_path):

    src = tmp_path / "dinov2_tiny.pth"
    torch.save(tiny_hub_state(), src)
    code, out, err, _ = ornis("convert", "dinov2", str(src), "-o", "v.pt", env=env, cwd=tmp_path, umask=0o022)
    assert code == 0, err
    assert out.startswith("wrote v.pt (vit_reg4_s14_nps_ls, 28x28")
    assert (tmp_path / "v.pt").stat().st_mode & 0o777 == 0o644
