"""Downloads of published weights through huggingface_hub, against a loopback hub: clean, resumed, stalled,
corrupt, concurrent, offline, refused, mirrored; and the rule that by-name loading only accepts files whose sha256
is in the manifest."""

from __future__ import annotations

import multiprocessing
import os
import socket
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from support.hub import LoopbackHub, resolve_path, running_hub, weights_entry
from tqdm import tqdm

import ornis
from ornis.errors import ChecksumError, WeightsNotFoundError
from ornis.utils.progress import progress_enabled
from ornis.weights import cache, download, hub, manifest
from ornis.weights.checkpoint import sha256_file

NAME = "vit_reg4_t16_ls_test-weights"
NETWORK = "vit_reg4_t16_ls"
# ~12.5 MiB: more than one of the 10 MiB pieces huggingface_hub writes at a time, so a cut transfer has kept bytes
# to resume from
SMALL = {"num_layers": 7}
PIECE = huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE
PATH = resolve_path(NAME)
STALL_AT = PIECE + 4 * 65536  # bytes of the body before the loopback hub goes silent: past the first piece


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    torch.manual_seed(0)
    net = ornis.build_model(NETWORK, size=32, num_classes=3, config=SMALL)
    path = tmp_path_factory.mktemp("ckpt") / "w.pt"
    ornis.save_model(net, path, config=SMALL)
    assert path.stat().st_size > PIECE + 2**20
    return path.read_bytes()


@pytest.fixture()
def server(checkpoint_bytes: bytes):
    with running_hub() as srv:
        srv.publish(f"birder-project/{NAME}", f"{NAME}.pt", checkpoint_bytes)
        yield srv


@pytest.fixture()
def entry(server: LoopbackHub, checkpoint_bytes: bytes, monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """A manifest entry for the test checkpoint, published on ``server``; a fresh cache; network allowed."""
    weights = weights_entry(NAME, NETWORK, checkpoint_bytes, num_classes=3, endpoint=server.url)
    monkeypatch.setitem(manifest.MANIFEST, NAME, weights)
    monkeypatch.setenv("ORNIS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ORNIS_OFFLINE", "0")
    for var in ("ORNIS_BASE_URL", "HF_ENDPOINT", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    return weights


def cache_files(tmp_path: Path) -> list[str]:
    root = tmp_path / "cache" / "weights"
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def hub_files(tmp_path: Path) -> list[str]:
    """The files (not folders, locks or tags) left in huggingface_hub's cache."""
    root = tmp_path / "cache" / "hub"
    found = (p for p in root.rglob("*") if (p.is_file() or p.is_symlink()) and ".locks" not in p.parts)
    return sorted(str(p.relative_to(root)) for p in found if p.name not in ("CACHEDIR.TAG", "main"))


def test_clean_download_then_load(entry, server, checkpoint_bytes, tmp_path):
    net, info = ornis.load_pretrained_model(NAME, progress_bar=False)
    path = tmp_path / "cache" / "weights" / f"{NAME}.pt"
    assert info.path == path
    assert sha256_file(path) == entry.files[0].sha256
    assert server.bytes_sent == len(checkpoint_bytes)
    assert [(r.method, r.path, r.range) for r in server.requests] == [("HEAD", PATH, None), ("GET", PATH, None)]
    assert cache_files(tmp_path) == [f"{NAME}.pt", f"{NAME}.pt.verified.json"]
    assert hub_files(tmp_path) == []  # moved out of the hub cache: one copy on disk
    assert net.name == NETWORK and net.num_classes == 3
    # A second load uses the cache: nothing more is asked of the hub
    ornis.load_pretrained_model(NAME)
    assert len(server.requests) == 2


def test_interrupted_download_resumes_with_range(entry, server, checkpoint_bytes, tmp_path):
    size = len(checkpoint_bytes)
    server.cut_after = PIECE + 2**20
    path = cache.resolve_weights(NAME, progress=False)
    assert sha256_file(path) == entry.files[0].sha256
    assert server.gets() == [(PATH, None), (PATH, f"bytes={PIECE}-")]  # the piece on disk is kept
    assert server.bytes_sent == PIECE + 2**20 + size - PIECE < 2 * size
    assert cache_files(tmp_path) == [f"{NAME}.pt", f"{NAME}.pt.verified.json"]


def test_stalled_connection_times_out_and_resumes(entry, server, checkpoint_bytes, monkeypatch):
    # What HF_HUB_DOWNLOAD_TIMEOUT=1 sets (huggingface_hub reads the variable once, at import)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DOWNLOAD_TIMEOUT", 1)
    server.stall_after, server.stall_s = STALL_AT, 6.0
    t0 = time.monotonic()
    path = cache.resolve_weights(NAME, progress=False)
    assert time.monotonic() - t0 < 6.0  # the client gave up on the silent connection instead of waiting it out
    assert server.gets() == [(PATH, None), (PATH, f"bytes={PIECE}-")]
    assert path.read_bytes() == checkpoint_bytes


def test_server_that_ignores_range_restarts_cleanly(entry, server, checkpoint_bytes):
    server.cut_after = PIECE + 2**20
    server.ignore_range = True  # the resumed request gets the whole file: it must replace the piece, not extend it
    path = cache.resolve_weights(NAME, progress=False)
    assert server.gets() == [(PATH, None), (PATH, f"bytes={PIECE}-")]
    assert path.read_bytes() == checkpoint_bytes


def test_corrupt_download_raises_and_leaves_nothing(entry, server, tmp_path):
    """A mirror that serves other bytes under the published ETag: huggingface_hub checks the size only; ornis's
    sha256 check refuses the file and deletes it from the hub cache too, so no later call can pick it up."""
    server.corrupt = True
    with pytest.raises(ChecksumError, match=entry.files[0].sha256) as e:
        ornis.load_pretrained_model(NAME, progress_bar=False)
    assert f"downloaded from {server.url}{PATH}" in str(e.value) and "\n" not in str(e.value)
    assert cache_files(tmp_path) == []
    assert hub_files(tmp_path) == []
    server.corrupt = False  # the mirror is fixed: the next call downloads again
    assert cache.resolve_weights(NAME, progress=False).is_file()
    assert len(server.gets()) == 2


def _download_in_child(cache_root: str) -> None:
    weights = manifest.MANIFEST[NAME]
    dst = Path(cache_root) / "weights" / f"{NAME}.pt"
    download.fetch(hub.locate(weights), dst, weights.file(), hub_cache=Path(cache_root) / "hub", progress=False)


def test_two_processes_download_once(entry, server, checkpoint_bytes, tmp_path):
    server.delay_per_chunk = 0.005  # long enough that the second process arrives while the first is busy
    root = tmp_path / "cache"
    f = entry.files[0]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_download_in_child, args=(str(root),)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert server.bytes_sent == len(checkpoint_bytes)  # one download; the other process waited and reused it
    assert [r.method for r in server.requests] == ["HEAD", "GET"]
    assert sha256_file(root / "weights" / f"{NAME}.pt") == f.sha256
    assert cache_files(tmp_path) == [f"{NAME}.pt", f"{NAME}.pt.verified.json"]


@pytest.mark.parametrize("variable", ["ORNIS_OFFLINE", "HF_HUB_OFFLINE"])
def test_offline_error_says_what_to_put_where(entry, server, tmp_path, monkeypatch, variable):
    monkeypatch.setenv(variable, "1")
    with pytest.raises(WeightsNotFoundError) as e:
        ornis.load_pretrained_model(NAME)
    msg = str(e.value)
    assert f"offline mode is on ({variable})" in msg and "\n" not in msg
    assert f"{server.url}{PATH}" in msg and f"repository birder-project/{NAME}" in msg
    assert str(tmp_path / "cache" / "weights" / f"{NAME}.pt") in msg
    assert entry.files[0].sha256 in msg
    assert server.requests == []


def test_refused_connection_fails_fast_then_explains(entry, tmp_path):
    """Nobody listening is not a slow network: one quick second try (huggingface_hub alone would back off for
    ~23 s before giving up)."""
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    endpoint = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match=r"Connection refused\); gave up after 2 attempts") as e:
        cache.resolve_weights(NAME, base_url=endpoint, progress=False)
    assert time.monotonic() - t0 < 3
    assert f"{endpoint}{PATH}" in str(e.value)
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
def test_malformed_base_url_fails_at_once(entry, tmp_path, base_url, why):
    """A typo in the mirror is not a network failure: no connection, no retry, no cache folder made."""
    t0 = time.monotonic()
    with pytest.raises(WeightsNotFoundError, match="is not a valid download URL") as e:
        cache.resolve_weights(NAME, base_url=base_url, progress=False)
    assert time.monotonic() - t0 < 1
    assert why in str(e.value) and "ORNIS_BASE_URL" in str(e.value)
    assert not (tmp_path / "cache").exists()


def test_server_errors_are_still_retried(entry, server, checkpoint_bytes):
    """5xx answers (a busy or restarting hub) are retried by huggingface_hub: two, then the file."""
    server.fail_with = [503, 502]
    path = cache.resolve_weights(NAME, progress=False)
    assert path.read_bytes() == checkpoint_bytes
    assert [r.method for r in server.requests] == ["HEAD", "HEAD", "HEAD", "GET"]


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
    server.repos[f"birder-project/{NAME}"].clear()
    with pytest.raises(WeightsNotFoundError, match=rf"HTTP 404: birder-project/{NAME} has no file {NAME}.pt"):
        cache.resolve_weights(NAME, progress=False)
    assert [r.method for r in server.requests] == ["HEAD"]


def test_mirror_from_environment(entry, server, checkpoint_bytes, monkeypatch):
    monkeypatch.setenv("ORNIS_BASE_URL", f"{server.url}/mirror")
    cache.resolve_weights(NAME, progress=False)
    assert server.gets() == [(f"/mirror{PATH}", None)]


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
    st = path.stat()  # mtime changes: the marker no longer vouches for the file
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
    cache.resolve_weights(NAME)
    assert calls == [path]


def test_progress_bar_on_stderr_when_asked(entry, server, checkpoint_bytes, capsys):
    cache.resolve_weights(NAME, progress=True)
    err = capsys.readouterr().err
    size = tqdm.format_sizeof(len(checkpoint_bytes), divisor=1024)
    assert f"{NAME}.pt" in err and "100%" in err and f"{size}/{size}" in err
    assert progress_enabled(False) is False


def test_no_progress_bar_when_not_asked(entry, server, capsys):
    cache.resolve_weights(NAME, progress=False)
    assert capsys.readouterr().err == ""
