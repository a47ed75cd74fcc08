"""Downloads of published weights, against a loopback HTTP server: clean, resumed, corrupt, concurrent, offline,
mirrored; and the rule that by-name loading only accepts files whose sha256 is in the manifest."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from pathlib import Path

import pytest
import torch
from support.hub import WeightsServer, running_server, weights_entry

import ornis
from ornis.errors import ChecksumError, WeightsNotFoundError
from ornis.utils.progress import progress_enabled
from ornis.weights import cache, download, manifest
from ornis.weights.checkpoint import sha256_file
from ornis.weights.manifest import WeightsFile

NAME = "vit_reg4_t16_ls_test-weights"
NETWORK = "vit_reg4_t16_ls"
SMALL = {"num_layers": 2}  # a ~4 MB checkpoint: many chunks, quick to serve


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    torch.manual_seed(0)
    net = ornis.build_model(NETWORK, size=32, num_classes=3, config=SMALL)
    path = tmp_path_factory.mktemp("ckpt") / "w.pt"
    ornis.save_model(net, path, config=SMALL)
    return path.read_bytes()


@pytest.fixture()
def server(checkpoint_bytes: bytes):
    with running_server(
        {f"/primary/{NAME}.pt": checkpoint_bytes, f"/mirror/{NAME}/{NAME}.pt": checkpoint_bytes}
    ) as srv:
        yield srv


@pytest.fixture()
def entry(server: WeightsServer, checkpoint_bytes: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A manifest entry for the test checkpoint, served by ``server``; a fresh cache; network allowed."""
    weights = weights_entry(NAME, NETWORK, checkpoint_bytes, num_classes=3, base_url=f"{server.url}/primary")
    monkeypatch.setitem(manifest.MANIFEST, NAME, weights)
    monkeypatch.setenv("ORNIS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ORNIS_OFFLINE", "0")
    monkeypatch.delenv("ORNIS_BASE_URL", raising=False)
    monkeypatch.setattr(download, "BACKOFF_S", 0.01)
    monkeypatch.setattr(download, "CHUNK_BYTES", 65536)
    return weights


def cache_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "weights"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_clean_download_then_load(entry, server, checkpoint_bytes, tmp_path):
    net, info = ornis.load_pretrained_model(NAME, progress_bar=False)
    path = tmp_path / "cache" / "weights" / f"{NAME}.pt"
    assert info.path == path
    assert sha256_file(path) == entry.files[0].sha256
    assert server.bytes_sent == len(checkpoint_bytes)
    assert [r for r in server.requests] == [(f"/primary/{NAME}.pt", None)]
    assert cache_files(tmp_path) == [f"{NAME}.pt", f"{NAME}.pt.verified.json"]
    assert net.name == NETWORK and net.num_classes == 3
    # A second load uses the cache: nothing more is fetched
    ornis.load_pretrained_model(NAME)
    assert len(server.requests) == 1


def test_interrupted_download_resumes_with_range(entry, server, checkpoint_bytes, tmp_path):
    size = len(checkpoint_bytes)
    server.cut_after = size // 2
    path = ornis.weights.cache.resolve_weights(NAME, progress=False)
    assert sha256_file(path) == entry.files[0].sha256
    assert len(server.requests) == 2
    first, second = server.requests
    assert first[1] is None
    resumed_from = int(second[1].removeprefix("bytes=").rstrip("-"))
    assert 0 < resumed_from <= size // 2
    second_bytes = server.bytes_sent - size // 2
    assert second_bytes == size - resumed_from < size
    assert cache_files(tmp_path) == [f"{NAME}.pt", f"{NAME}.pt.verified.json"]


def test_partial_file_from_an_earlier_run_is_resumed(entry, server, checkpoint_bytes, tmp_path):
    part = tmp_path / "cache" / "weights" / f"{NAME}.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(checkpoint_bytes[:300_000])
    cache.resolve_weights(NAME, progress=False)
    assert server.requests == [(f"/primary/{NAME}.pt", "bytes=300000-")]
    assert server.bytes_sent == len(checkpoint_bytes) - 300_000


def test_stalled_connection_times_out_and_resumes(entry, server, checkpoint_bytes, monkeypatch):
    monkeypatch.setattr(download, "TIMEOUT_S", 0.3)
    server.stall_once = 2.0
    t0 = time.monotonic()
    path = cache.resolve_weights(NAME, progress=False)
    assert time.monotonic() - t0 < 2.0  # the client gave up on the silent connection instead of waiting it out
    assert len(server.requests) == 2 and server.requests[1][1] == "bytes=65536-"
    assert path.read_bytes() == checkpoint_bytes


def test_server_that_ignores_range_restarts_cleanly(entry, server, checkpoint_bytes, tmp_path):
    part = tmp_path / "cache" / "weights" / f"{NAME}.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * 1000)  # garbage that a 200 answer must overwrite, not extend
    server.ignore_range = True
    path = cache.resolve_weights(NAME, progress=False)
    assert server.requests[0][1] == "bytes=1000-"
    assert path.read_bytes() == checkpoint_bytes


def test_corrupt_download_raises_and_leaves_nothing(entry, server, tmp_path):
    server.corrupt = True
    with pytest.raises(ChecksumError, match=entry.files[0].sha256):
        ornis.load_pretrained_model(NAME, progress_bar=False)
    assert cache_files(tmp_path) == []


def _download_in_child(cache_root: str, url: str, sha: str, size_mb: float) -> None:
    download.fetch(url, Path(cache_root) / f"{NAME}.pt", WeightsFile("pt", size_mb, sha), progress=False)


def test_two_processes_download_once(entry, server, checkpoint_bytes, tmp_path):
    server.delay_per_chunk = 0.02  # long enough that the second process arrives while the first is busy
    root = tmp_path / "cache" / "weights"
    f = entry.files[0]
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_download_in_child, args=(str(root), entry.url(), f.sha256, f.size_mb)) for _ in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert server.bytes_sent == len(checkpoint_bytes)  # one download; the other process waited and reused it
    assert len(server.requests) == 1
    assert sha256_file(root / f"{NAME}.pt") == f.sha256
    assert cache_files(tmp_path) == [f"{NAME}.pt", f"{NAME}.pt.verified.json"]


def test_offline_error_says_what_to_put_where(entry, server, tmp_path, monkeypatch):
    monkeypatch.setenv("ORNIS_OFFLINE", "1")
    with pytest.raises(WeightsNotFoundError) as e:
        ornis.load_pretrained_model(NAME)
    msg = str(e.value)
    assert f"{server.url}/primary/{NAME}.pt" in msg
    assert str(tmp_path / "cache" / "weights" / f"{NAME}.pt") in msg
    assert entry.files[0].sha256 in msg
    assert server.requests == []


def test_refused_connection_fails_fast_then_explains(entry, tmp_path, monkeypatch):
    """Nobody listening is not a slow network: one quick second try, not RETRIES backed-off waits (before: six
    attempts over ~31 s with the default 1 s back-off)."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(download, "BACKOFF_S", 1.0)  # the default
    url = f"http://127.0.0.1:{port}/w"
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match=r"Connection refused\); gave up after 2 attempts") as e:
        cache.resolve_weights(NAME, base_url=url, progress=False)
    assert time.monotonic() - t0 < 3
    assert f"{url}/{NAME}.pt" in str(e.value)
    assert str(tmp_path / "cache" / "weights" / f"{NAME}.pt") in str(e.value)


@pytest.mark.parametrize(
    ("base_url", "why"),
    [
        ("localhost:8000/w", "the scheme is 'localhost'"),
        ("http//mirror/w", "the scheme is none"),
        ("http://mirror:port/w", "Port could not be cast"),
        ("ftp://mirror/w", "the scheme is 'ftp'"),
        ("http:///w", "it names no host"),
    ],
)
def test_malformed_base_url_fails_at_once(entry, tmp_path, monkeypatch, base_url, why):
    """A typo in the mirror is not a network failure: no connection, no retry, no cache folder made."""
    monkeypatch.setattr(download, "BACKOFF_S", 1.0)
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match="is not a valid download URL") as e:
        cache.resolve_weights(NAME, base_url=base_url, progress=False)
    assert time.monotonic() - t0 < 1
    assert why in str(e.value) and "ORNIS_BASE_URL" in str(e.value)
    assert cache_files(tmp_path) == []


def test_server_errors_are_still_retried(entry, server, checkpoint_bytes, tmp_path):
    """5xx answers (a busy or restarting hub) keep their retries: two 503s, then the file."""
    server.fail_with = [503, 502]
    path = cache.resolve_weights(NAME, progress=False)
    assert path.read_bytes() == checkpoint_bytes
    assert len(server.requests) == 3


def test_cache_that_is_a_file_is_named(entry, server, tmp_path, monkeypatch):
    blocker = tmp_path / "cache-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ORNIS_CACHE", str(blocker))
    with pytest.raises(WeightsNotFoundError, match=rf"ORNIS_CACHE={blocker}: .* {blocker} is a file, not a folder"):
        cache.resolve_weights(NAME, progress=False)
    monkeypatch.setenv("ORNIS_OFFLINE", "1")  # offline too: "put the file at <a path under a file>" would be no help
    with pytest.raises(WeightsNotFoundError, match=rf"ORNIS_CACHE={blocker}: .* is a file, not a folder"):
        ornis.load_pretrained_model(NAME)
    assert server.requests == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_cache_is_named(entry, server, tmp_path, monkeypatch):
    root = tmp_path / "ro"
    root.mkdir()
    root.chmod(0o555)
    monkeypatch.setenv("ORNIS_CACHE", str(root))
    try:
        with pytest.raises(WeightsNotFoundError, match=rf"ORNIS_CACHE={root}: .*cannot be made \(Permission denied\)"):
            cache.resolve_weights(NAME, progress=False)
    finally:
        root.chmod(0o755)
    assert server.requests == []


def test_unwritable_cache_is_named(entry, server, tmp_path, monkeypatch):
    """The same check as a read-only folder, seen through os.access (which root passes on a real one)."""
    root = tmp_path / "shared"
    monkeypatch.setenv("ORNIS_CACHE", str(root))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(root)) else real_access(p, mode))
    with pytest.raises(WeightsNotFoundError) as e:
        cache.resolve_weights(NAME, progress=False)
    assert str(e.value) == (
        f"ORNIS_CACHE={root}: the weights cache cannot be used: {root / 'weights'} is not writable; point "
        "ORNIS_CACHE (or --cache) at a writable folder"
    )
    assert server.requests == []


def test_read_only_cache_with_the_file_still_loads(entry, server, checkpoint_bytes, tmp_path, monkeypatch):
    """A shared cache others filled and this user cannot write: the verified marker cannot be written, the file
    is used all the same (and re-hashed next time)."""
    path = cache.resolve_weights(NAME, progress=False)
    download.marker_path(path).unlink()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(download.marker_path(path)))

    monkeypatch.setattr(download, "atomic_write_json", refuse)
    assert cache.resolve_weights(NAME, progress=False) == path
    assert not download.marker_path(path).exists()


def test_downloaded_files_follow_the_umask(entry, server, tmp_path):
    old = os.umask(0o022)
    try:
        path = cache.resolve_weights(NAME, progress=False)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert download.marker_path(path).stat().st_mode & 0o777 == 0o644


def test_missing_file_is_not_retried(entry, server, tmp_path):
    with pytest.raises(WeightsNotFoundError, match="HTTP 404"):
        cache.resolve_weights(NAME, base_url=f"{server.url}/nowhere", progress=False)
    assert len(server.requests) == 1


def test_mirror_from_environment(entry, server, checkpoint_bytes, monkeypatch):
    monkeypatch.setenv("ORNIS_BASE_URL", f"{server.url}/mirror/{{name}}")
    cache.resolve_weights(NAME, progress=False)
    assert server.requests == [(f"/mirror/{NAME}/{NAME}.pt", None)]


def test_cached_file_not_in_manifest_loads_only_by_path(entry, server, tmp_path):
    path = cache.resolve_weights(NAME, progress=False)
    # Swap in other weights (a valid checkpoint, but not the published bytes)
    torch.manual_seed(1)
    ornis.save_model(ornis.build_model(NETWORK, size=32, num_classes=3, config=SMALL), path, config=SMALL)
    with pytest.raises(ChecksumError, match="expected " + entry.files[0].sha256):
        ornis.load_pretrained_model(NAME)
    _net, info = ornis.load_pretrained_model(path)  # the explicit path is the user's choice
    assert info.path == path
    results = cache.verify_cached([NAME])
    assert [(r.name, r.ok) for r in results] == [(NAME, False)]


def test_verified_marker_skips_rehash_until_file_changes(entry, server, monkeypatch):
    path = cache.resolve_weights(NAME, progress=False)
    calls = []
    monkeypatch.setattr(cache, "sha256_file", lambda p: calls.append(p) or sha256_file(p))
    cache.resolve_weights(NAME)
    assert calls == []
    path.touch()  # mtime changes: the marker no longer vouches for the file
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    cache.resolve_weights(NAME)
    assert calls == [path]


def test_progress_bar_on_stderr_when_asked(entry, server, checkpoint_bytes, capsys):
    cache.resolve_weights(NAME, progress=True)
    err = capsys.readouterr().err
    mib = len(checkpoint_bytes) / 2**20  # tqdm scales bytes by 1024
    assert f"{NAME}.pt" in err and "100%" in err and f"{mib:.2f}M/{mib:.2f}M" in err
    assert progress_enabled(False) is False


def test_no_progress_bar_when_not_asked(entry, server, capsys):
    cache.resolve_weights(NAME, progress=False)
    assert capsys.readouterr().err == ""


def test_stale_partial_file_is_discarded_after_a_bad_resume(entry, server, checkpoint_bytes, tmp_path):
    part = tmp_path / "cache" / "weights" / f"{NAME}.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\1" * 1000)  # left over from some other file: resuming it gives the wrong digest
    path = cache.resolve_weights(NAME, progress=False)
    assert server.requests == [(f"/primary/{NAME}.pt", "bytes=1000-"), (f"/primary/{NAME}.pt", None)]
    assert path.read_bytes() == checkpoint_bytes
