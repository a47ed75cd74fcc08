"""Fetching published weights into the cache: streamed, resumable, verified, atomic and locked.

The bytes go to ``<file>.part`` beside their destination. An interrupted transfer keeps that file and the next
attempt asks for the rest with ``Range: bytes=N-`` (a server that answers 200 instead of 206 is read from the start
again). The sha256 is computed while the bytes arrive; only a file whose digest matches the manifest is renamed to
its final name (``os.replace``, atomic on one file system), so a reader never sees a partial or wrong file. A
``<file>.lock`` held with ``fcntl.flock`` makes a second process wait for the first and then use its result instead
of downloading again. Only ``urllib.request`` is used: no extra dependency.
"""

from __future__ import annotations

import fcntl
import hashlib
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from ornis.errors import ChecksumError, WeightsNotFoundError
from ornis.weights.checkpoint import sha256_file
from ornis.weights.manifest import WeightsFile

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole file
RETRIES = 5  # transient failures in a row before giving up; progress made resets the count
BACKOFF_S = 1.0  # first wait between retries, doubled each time
MAX_BACKOFF_S = 30.0
USER_AGENT = "ornis-weights-downloader"

# Server answers worth retrying: rate limiting and the server's own trouble. Anything else (404, 403...) is final.
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class _TransientError(Exception):
    """A failure that another attempt may not meet (connection reset, timeout, short read, 5xx)."""


class _FinalError(Exception):
    """A failure that retrying will not fix (404, 403...)."""


def part_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".part")


def lock_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".lock")


def marker_path(dst: Path) -> Path:
    return dst.with_name(dst.name + ".verified.json")


# -- verified marker ---------------------------------------------------------------------------------------------
def write_marker(path: Path, sha256: str) -> None:
    """Record that ``path``, at its current size and mtime, has digest ``sha256`` (so loads need not re-hash it)."""
    st = path.stat()
    data = {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    tmp = marker_path(path).with_name(marker_path(path).name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, marker_path(path))


def marker_matches(path: Path, sha256: str) -> bool:
    """Whether ``path`` was verified against ``sha256`` and has not changed (size, mtime) since."""
    try:
        data = json.loads(marker_path(path).read_text())
        st = path.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(data, dict)
        and data.get("sha256") == sha256
        and data.get("size") == st.st_size
        and data.get("mtime_ns") == st.st_mtime_ns
    )


# -- lock --------------------------------------------------------------------------------------------------------
@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path``, removed again when released.

    Removing a lock file is racy unless a waiter checks, once it holds the lock, that the name still points to the
    file it locked; if the holder removed it meanwhile, the waiter starts over on a fresh file.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        os.close(fd)  # closing releases the flock


# -- progress bar ------------------------------------------------------------------------------------------------
class ProgressBar:
    """A one-line progress bar on a stream (stderr), redrawn at most ten times a second."""

    def __init__(self, label: str, total: int | None, start: int = 0, stream: IO[str] | None = None) -> None:
        self.label = label
        self.total = total
        self.done = start
        self.first = start
        self.stream = stream or sys.stderr
        self.t0 = time.monotonic()
        self.last_draw = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.last_draw >= 0.1:
            self.last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        mb = self.done / 1e6
        rate = (self.done - self.first) / 1e6 / max(now - self.t0, 1e-6)
        if self.total:
            frac = min(self.done / self.total, 1.0)
            bar = "#" * int(frac * 30)
            text = f"{self.label} [{bar:<30}] {frac:4.0%} {mb:.1f}/{self.total / 1e6:.1f} MB {rate:.1f} MB/s"
        else:
            text = f"{self.label} {mb:.1f} MB {rate:.1f} MB/s"
        self.stream.write("\r" + text)
        self.stream.flush()

    def close(self) -> None:
        self._draw(time.monotonic())
        self.stream.write("\n")
        self.stream.flush()


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` if given, else on when stderr is a terminal."""
    if progress is not None:
        return progress
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


# -- download ----------------------------------------------------------------------------------------------------
def fetch(
    url: str,
    dst: Path,
    expected: WeightsFile,
    *,
    progress: bool | None = None,
    timeout: float | None = None,
    retries: int | None = None,
    backoff: float | None = None,
) -> Path:
    """Download ``url`` to ``dst`` unless a verified copy is already there; returns ``dst``.

    Raises ``WeightsNotFoundError`` when the file cannot be had (unreachable, 404, retries spent), naming the URL
    and where to put the file by hand, and ``ChecksumError`` when the bytes do not match ``expected.sha256`` (the
    partial file is removed: nothing is left in the cache).
    """
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(lock_path(dst)):
        # Another process may have finished the same file while this one waited for the lock
        if dst.is_file() and (marker_matches(dst, expected.sha256) or sha256_file(dst) == expected.sha256):
            if not marker_matches(dst, expected.sha256):
                write_marker(dst, expected.sha256)
            return dst
        settings = {
            "show": progress_enabled(progress),
            "timeout": TIMEOUT_S if timeout is None else timeout,
            "retries": RETRIES if retries is None else retries,
            "backoff": BACKOFF_S if backoff is None else backoff,
            "dst": dst,
        }
        resumed = part_path(dst).is_file()
        digest = _download(url, part_path(dst), expected, **settings)
        if digest != expected.sha256 and resumed:
            # The leftover partial file may come from another version of the file: one clean try from zero
            part_path(dst).unlink(missing_ok=True)
            digest = _download(url, part_path(dst), expected, **settings)
        if digest != expected.sha256:
            part_path(dst).unlink(missing_ok=True)
            raise ChecksumError(
                f"{dst.name}: the bytes downloaded from {url} have sha256 {digest}, expected {expected.sha256}; "
                "the file was discarded (a corrupt mirror or a changed upstream file?)"
            )
        os.replace(part_path(dst), dst)
        write_marker(dst, digest)
    return dst


class _Digest:
    """A sha256 that can start over (when a server answers a Range request with the whole file)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._h = hashlib.sha256()

    def update(self, data: bytes) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        return self._h.hexdigest()


def _download(
    url: str, part: Path, expected: WeightsFile, *, show: bool, timeout: float, retries: int, backoff: float, dst: Path
) -> str:
    """Bring ``part`` to the complete file, resuming what is there; returns its sha256."""
    failures = 0
    last_error = ""
    while True:
        hasher = _Digest()
        offset = 0
        if part.is_file():
            # Resume: the digest must cover the bytes already on disk
            with open(part, "rb") as f:
                while block := f.read(CHUNK_BYTES):
                    hasher.update(block)
                    offset += len(block)
        try:
            received = _transfer(url, part, offset, hasher, show=show, timeout=timeout)
            return hasher.hexdigest() if received is not None else sha256_file(part)
        except _FinalError as e:
            raise WeightsNotFoundError(_unavailable(url, dst, expected, str(e))) from None
        except _TransientError as e:
            last_error = str(e)
            progressed = part.is_file() and part.stat().st_size > offset
            failures = 0 if progressed else failures + 1
            if failures > retries:
                raise WeightsNotFoundError(
                    _unavailable(url, dst, expected, f"{last_error}; gave up after {retries + 1} attempts")
                ) from None
            if not progressed:
                time.sleep(min(backoff * 2 ** (failures - 1), MAX_BACKOFF_S))


def _transfer(url: str, part: Path, offset: int, hasher: _Digest, *, show: bool, timeout: float) -> int | None:
    """One HTTP request: append from ``offset`` (or start over). Returns bytes received, or None when the server
    says the range is already complete (the caller re-hashes the part file)."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Range not satisfiable: the part file already holds the whole file (or more, which the hash will show)
            return None
        if e.code in TRANSIENT_HTTP:
            raise _TransientError(f"HTTP {e.code} {e.reason}") from None
        raise _FinalError(f"HTTP {e.code} {e.reason}") from None
    except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        raise _TransientError(f"cannot connect ({reason})") from None

    with response:
        status = response.status
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                raise _TransientError(f"asked for bytes from {offset}, the server sent from {start}")
            mode = "ab"
        elif status == 200:
            # The server ignored the Range header: the body is the whole file, so start over
            hasher.reset()
            offset = 0
            mode = "wb"
        else:
            raise _TransientError(f"unexpected HTTP status {status}")
        length = response.headers.get("Content-Length")
        total = offset + int(length) if length is not None and length.isdigit() else None
        bar = ProgressBar(part.name.removesuffix(".part"), total, offset) if show else None
        received = 0
        try:
            with open(part, mode) as out:
                while True:
                    try:
                        block = response.read(CHUNK_BYTES)
                    except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
                        raise _TransientError(f"connection lost after {offset + received} bytes ({e})") from None
                    if not block:
                        break
                    out.write(block)
                    hasher.update(block)
                    received += len(block)
                    if bar is not None:
                        bar.update(len(block))
        finally:
            if bar is not None:
                bar.close()
        if length is not None and length.isdigit() and received < int(length):
            raise _TransientError(f"connection closed after {offset + received} of {total} bytes")
        return received


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/200"
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def _unavailable(url: str, dst: Path, expected: WeightsFile, reason: str) -> str:
    return (
        f"{dst.name}: cannot download {url}: {reason}. Without network, fetch that URL elsewhere "
        f"(about {expected.size_mb:.1f} MB, sha256 {expected.sha256}) and put it at {dst}, or set ORNIS_BASE_URL "
        "to a mirror"
    )
