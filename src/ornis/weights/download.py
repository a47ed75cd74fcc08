"""Fetching published weights into the cache: streamed, resumable, verified, atomic and locked.

The bytes go to ``<file>.part`` beside their destination. An interrupted transfer keeps that file and the next
attempt asks for the rest with ``Range: bytes=N-`` (a server that answers 200 instead of 206 is read from the start
again). The sha256 is computed while the bytes arrive; only a file whose digest matches the manifest is renamed to
its final name (``os.replace``, atomic on one file system), so a reader never sees a partial or wrong file. A lock
(``ornis.utils.locks.file_lock``) on ``<folder>/../.locks/<file>.lock`` makes a second process wait for the first
and then use its result instead of downloading again; the lock files live outside the weights folder, as
huggingface_hub keeps its own, so that folder holds only weights and their verified markers. Only
``urllib.request`` is used for the transfer: no extra dependency.
"""

from __future__ import annotations

import errno
import hashlib
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from ornis.errors import ChecksumError, WeightsNotFoundError
from ornis.utils.fs import atomic_write_json
from ornis.utils.locks import file_lock
from ornis.utils.progress import progress_bar
from ornis.weights.checkpoint import sha256_file
from ornis.weights.manifest import WeightsFile

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 30.0  # per socket operation (connect, each read), not for the whole file
RETRIES = 5  # transient failures in a row before giving up; progress made resets the count
BACKOFF_S = 1.0  # first wait between retries, doubled each time
MAX_BACKOFF_S = 30.0
# A server that refuses the connection, or a host name that does not resolve, is not coming back in a few seconds:
# one quick second try (a server restarting), then the error, instead of RETRIES backed-off waits (~36 s)
UNREACHABLE_RETRIES = 1
UNREACHABLE_WAIT_S = 0.5
URL_SCHEMES = ("http", "https")
_UNREACHABLE_ERRNOS = {errno.ECONNREFUSED, errno.EHOSTUNREACH, errno.ENETUNREACH}
USER_AGENT = "ornis-weights-downloader"

# Server answers worth retrying: rate limiting and the server's own trouble. Anything else (404, 403...) is final.
TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class _TransientError(Exception):
    """A failure that another attempt may not meet (connection reset, timeout, short read, 5xx)."""


class _FinalError(Exception):
    """A failure that retrying will not fix (404, 403...)."""


class _UnreachableError(Exception):
    """Nobody answers at that address (connection refused, unknown host, no route): worth one quick retry only."""


def check_url(url: str) -> None:
    """``WeightsNotFoundError`` at once, before any connection, unless ``url`` is a URL a download can use (http or
    https, with a host, a numeric port, no spaces): a malformed mirror is a typo, not a network failure to retry."""
    why = None
    try:
        parts = urllib.parse.urlsplit(url)
        _port = parts.port  # ValueError for a port that is not a number in range
    except ValueError as e:
        why = str(e)
    else:
        if parts.scheme not in URL_SCHEMES:
            found = f"{parts.scheme!r}" if parts.scheme else "none"
            why = f"the scheme is {found}, expected one of {', '.join(URL_SCHEMES)}"
        elif not parts.hostname:
            why = "it names no host"
        elif any(c.isspace() or ord(c) < 32 for c in url):
            why = "it contains spaces or control characters"
    if why is not None:
        raise WeightsNotFoundError(
            f"{url!r} is not a valid download URL ({why}); check --base-url / base_url= / ORNIS_BASE_URL"
        )


def part_path(dst: Path) -> Path:
    """Where the bytes of ``dst`` accumulate while they arrive."""
    return dst.with_name(dst.name + ".part")


def lock_path(dst: Path) -> Path:
    """The lock that serialises downloads of ``dst``: in a ``.locks`` folder beside ``dst``'s folder (the cache
    root, for cached weights)."""
    return dst.parent.parent / ".locks" / f"{dst.name}.lock"


def marker_path(dst: Path) -> Path:
    """The small JSON file that records ``dst``'s verified digest."""
    return dst.with_name(dst.name + ".verified.json")


# -- verified marker ---------------------------------------------------------------------------------------------
def write_marker(path: Path, sha256: str) -> None:
    """Record that ``path``, at its current size and mtime, has digest ``sha256`` (so loads need not re-hash it)."""
    st = path.stat()
    atomic_write_json(
        marker_path(path), {"sha256": sha256, "size": st.st_size, "mtime_ns": st.st_mtime_ns}, indent=None
    )


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


# -- download ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Transfer:
    """One file's download: where from, where to, and how patiently."""

    url: str
    dst: Path
    expected: WeightsFile
    progress: bool | None
    timeout: float
    retries: int
    backoff: float

    @property
    def part(self) -> Path:
        return part_path(self.dst)


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
    partial file is removed: nothing is left in the cache). ``progress``: a progress bar on stderr (default: when
    stderr is a terminal).
    """
    dst = Path(dst)
    check_url(url)
    dst.parent.mkdir(parents=True, exist_ok=True)
    job = _Transfer(
        url,
        dst,
        expected,
        progress,
        TIMEOUT_S if timeout is None else timeout,
        RETRIES if retries is None else retries,
        BACKOFF_S if backoff is None else backoff,
    )
    with file_lock(lock_path(dst)):
        # Another process may have finished the same file while this one waited for the lock
        if dst.is_file() and (marker_matches(dst, expected.sha256) or sha256_file(dst) == expected.sha256):
            if not marker_matches(dst, expected.sha256):
                write_marker(dst, expected.sha256)
            return dst
        resumed = job.part.is_file()
        digest = _download(job)
        if digest != expected.sha256 and resumed:
            # The leftover partial file may come from another version of the file: one clean try from zero
            job.part.unlink(missing_ok=True)
            digest = _download(job)
        if digest != expected.sha256:
            job.part.unlink(missing_ok=True)
            raise ChecksumError(
                f"{dst.name}: the bytes downloaded from {url} have sha256 {digest}, expected {expected.sha256}; "
                "the file was discarded (a corrupt mirror or a changed upstream file?)"
            )
        # The part file is complete and verified: renaming it (not atomic_path) keeps the resumable part protocol
        os.replace(job.part, dst)
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


def _download(job: _Transfer) -> str:
    """Bring the part file to the complete file, resuming what is there; returns its sha256."""
    failures = unreachable = 0
    while True:
        hasher = _Digest()
        offset = 0
        if job.part.is_file():
            # Resume: the digest must cover the bytes already on disk
            with open(job.part, "rb") as f:
                while block := f.read(CHUNK_BYTES):
                    hasher.update(block)
                    offset += len(block)
        try:
            received = _transfer(job, offset, hasher)
            return hasher.hexdigest() if received is not None else sha256_file(job.part)
        except _FinalError as e:
            raise WeightsNotFoundError(_unavailable(job, str(e))) from None
        except _UnreachableError as e:
            unreachable += 1
            if unreachable > UNREACHABLE_RETRIES:
                raise WeightsNotFoundError(_unavailable(job, f"{e}; gave up after {unreachable} attempts")) from None
            time.sleep(min(job.backoff, UNREACHABLE_WAIT_S))
        except _TransientError as e:
            progressed = job.part.is_file() and job.part.stat().st_size > offset
            failures = 0 if progressed else failures + 1
            if failures > job.retries:
                raise WeightsNotFoundError(
                    _unavailable(job, f"{e}; gave up after {job.retries + 1} attempts")
                ) from None
            if not progressed:
                time.sleep(min(job.backoff * 2 ** (failures - 1), MAX_BACKOFF_S))


def _transfer(job: _Transfer, offset: int, hasher: _Digest) -> int | None:
    """One HTTP request: append from ``offset`` (or start over). Returns bytes received, or None when the server
    says the range is already complete (the caller re-hashes the part file)."""
    headers = {"User-Agent": USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(job.url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=job.timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:
            # Range not satisfiable: the part file already holds the whole file (or more, which the hash will show)
            return None
        if e.code in TRANSIENT_HTTP:
            raise _TransientError(f"HTTP {e.code} {e.reason}") from None
        raise _FinalError(f"HTTP {e.code} {e.reason}") from None
    except (TimeoutError, urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError) as e:
        reason = getattr(e, "reason", e)
        if _is_unreachable(reason):
            raise _UnreachableError(f"cannot connect ({reason})") from None
        raise _TransientError(f"cannot connect ({reason})") from None
    except ValueError as e:  # http.client.InvalidURL and the like: what check_url could not see
        raise _FinalError(f"invalid URL ({e})") from None

    with response:
        status = response.status
        if status == 206:
            start = _content_range_start(response.headers.get("Content-Range"))
            if start != offset:
                raise _TransientError(f"asked for bytes from {offset}, the server sent from {start}")
        elif status == 200:
            # The server ignored the Range header: the body is the whole file, so start over
            hasher.reset()
            offset = 0
        else:
            raise _TransientError(f"unexpected HTTP status {status}")
        length = response.headers.get("Content-Length")
        expected = int(length) if length is not None and length.isdigit() else None
        received = _receive(job, response, offset, expected, hasher)
        if expected is not None and received < expected:
            raise _TransientError(f"connection closed after {offset + received} of {offset + expected} bytes")
        return received


def _receive(
    job: _Transfer, response: http.client.HTTPResponse, offset: int, length: int | None, hasher: _Digest
) -> int:
    """Write the response body to the part file from ``offset`` (0: start over), hashing it as it arrives."""
    total = offset + length if length is not None else None
    received = 0
    desc = job.dst.name
    with (
        open(job.part, "ab" if offset else "wb") as out,
        progress_bar(total, desc=desc, unit="B", enabled=job.progress, initial=offset) as bar,
    ):
        while True:
            try:
                block = response.read(CHUNK_BYTES)
            except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
                raise _TransientError(f"connection lost after {offset + received} bytes ({e})") from None
            if not block:
                return received
            out.write(block)
            hasher.update(block)
            received += len(block)
            bar.update(len(block))


def _is_unreachable(reason: object) -> bool:
    """Whether a connection failure means nobody is there (refused, unknown host, no route), not a slow network."""
    if isinstance(reason, ConnectionRefusedError | socket.gaierror):
        return True
    return isinstance(reason, OSError) and reason.errno in _UNREACHABLE_ERRNOS


def _content_range_start(value: str | None) -> int | None:
    # "bytes 100-199/200"
    if not value or not value.startswith("bytes "):
        return None
    try:
        return int(value[6:].split("-", 1)[0])
    except ValueError:
        return None


def _unavailable(job: _Transfer, reason: str) -> str:
    return (
        f"{job.dst.name}: cannot download {job.url}: {reason}. Without network, fetch that URL elsewhere "
        f"(about {job.expected.size_mb:.1f} MB, sha256 {job.expected.sha256}) and put it at {job.dst}, or set "
        "ORNIS_BASE_URL "
        "to a mirror"
    )
