"""Where a file or folder lives: on this machine (a ``Path``) or in object storage (a ``RemotePath``, any fsspec URL
such as ``s3://bucket/photos/`` or ``gs://bucket/emb``), and the few operations the batch runner needs on both.

A local path (or ``file://``) stays a ``pathlib.Path`` and keeps its POSIX behaviour: atomic rename, locks. A URL
goes through fsspec (``fsspec.core.url_to_fs``), so credentials and endpoints come from where that library's
backend looks for them (``AWS_*`` / ``AWS_ENDPOINT_URL`` for s3fs, ``gcloud`` for gcsfs, fsspec's own config).
Object stores have no rename and no locks, but a PUT is atomic: an object written with ``write_bytes`` (one
``pipe``) is seen whole or not at all, which is what the commits of the batch runner rest on.

``RemotePath`` has no ``__fspath__`` on purpose: handing one to ``open`` or ``os`` fails loudly instead of writing
a local file named ``s3:/...``. It keeps no filesystem object either (those are not fork-safe); fsspec's own
instance cache makes looking one up again cheap, and gives each DataLoader worker its own.
"""

from __future__ import annotations

import io
import json
import logging
import os
import posixpath
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import fsspec

from ornis.errors import OrnisError, first_line
from ornis.utils.fs import atomic_path, atomic_write_bytes

EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs"}  # protocol -> the ornis extra that installs it
# Clients that log each credential lookup at INFO; left at WARNING unless the user set their level
CHATTY_LOGGERS = ("botocore", "aiobotocore", "s3fs", "gcsfs", "google.auth", "fsspec")


class StorageError(OrnisError):
    """Object storage that cannot be used: its backend is not installed, the bucket does not exist, no credentials,
    the endpoint cannot be reached."""


def is_remote(location: str | os.PathLike | RemotePath) -> bool:
    """Whether ``location`` is a URL of an fsspec filesystem other than this machine's (``file://`` is local)."""
    if isinstance(location, RemotePath):
        return True
    text = os.fspath(location)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and scheme.lower() not in ("file", "local")


class RemotePath:
    """A file or folder in object storage, named by its URL (no trailing slash): ``/`` joins, ``name`` and
    ``parent`` as pathlib has them, ``exists`` / ``is_dir`` / ``is_file`` ask the store (never its cache)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/") if not url.endswith("://") else url

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}")

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def name(self) -> str:
        """The last part of the URL."""
        return posixpath.basename(self.url.split("://", 1)[1])

    @property
    def parent(self) -> RemotePath:
        """The folder (prefix) that holds this one."""
        scheme, rest = self.url.split("://", 1)
        return RemotePath(f"{scheme}://{posixpath.dirname(rest)}")

    def fs_path(self) -> tuple[fsspec.AbstractFileSystem, str]:
        """The fsspec filesystem and the path within it (``StorageError`` when its backend is not installed)."""
        return filesystem(self.url)

    def exists(self) -> bool:
        """Whether an object or a prefix of that name exists."""
        fs, path = self.fs_path()
        with storage_errors(self):
            fs.invalidate_cache(path)
            return fs.exists(path)

    def is_dir(self) -> bool:
        """Whether objects exist under this prefix."""
        fs, path = self.fs_path()
        with storage_errors(self):
            fs.invalidate_cache(path)
            return fs.isdir(path)

    def is_file(self) -> bool:
        """Whether an object of this name exists."""
        fs, path = self.fs_path()
        with storage_errors(self):
            fs.invalidate_cache(path)
            return fs.isfile(path)


Location = Path | RemotePath


def location(text: str | os.PathLike | RemotePath) -> Location:
    """``text`` as a ``RemotePath`` when it is a URL (see ``is_remote``), else as a ``Path`` (``file://`` removed)."""
    if isinstance(text, RemotePath):
        return text
    if is_remote(text):
        return RemotePath(os.fspath(text))
    raw = os.fspath(text)
    return Path(raw.split("://", 1)[1] if "://" in raw else raw)


def filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem of ``url`` and the path within it; ``StorageError`` naming the extra to install when its
    backend (s3fs, gcsfs) is missing."""
    for name in CHATTY_LOGGERS:
        logger = logging.getLogger(name)
        if logger.level == logging.NOTSET:
            logger.setLevel(logging.WARNING)
    try:
        return fsspec.core.url_to_fs(url)
    except ImportError:
        scheme = url.split("://", 1)[0].lower()
        extra = EXTRAS.get(scheme)
        hint = f"pip install 'ornis[{extra}]'" if extra else f"install the fsspec backend for {scheme}://"
        raise StorageError(f"{url}: reading and writing {scheme}:// needs its fsspec backend: {hint}") from None
    except ValueError as e:  # an unknown protocol
        raise StorageError(f"{url}: {first_line(e)}") from None


def same_place(text: str | os.PathLike) -> str:
    """One spelling of a place however it is written: the resolved path of a local one, the URL without its
    trailing slash of a remote one (object stores have no links and no ``..``)."""
    if is_remote(text):
        return os.fspath(text).rstrip("/")
    return os.path.realpath(os.fspath(text))


def join_name(base: str, name: str) -> str:
    """``name`` read from a list in folder ``base``: a URL or absolute path as is, a relative one under ``base``."""
    if is_remote(name) or os.path.isabs(name):
        return name
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else os.path.join(base, name)


@contextmanager
def storage_errors(where: Location | str) -> Iterator[None]:
    """Turn what a store's client raises into one-line errors naming ``where``: ``FileNotFoundError`` stays (callers
    decide what a missing object means), anything else from the client becomes a ``StorageError``."""
    try:
        yield
    except (OrnisError, FileNotFoundError):
        raise
    except OSError as e:
        raise StorageError(f"{where}: {e.strerror or first_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - botocore, google-auth, aiohttp: each client has its own exceptions
        if not _from_a_client(e):
            raise
        raise StorageError(f"{where}: {type(e).__name__}: {first_line(e)}") from None


def _from_a_client(e: BaseException) -> bool:
    module = type(e).__module__.split(".")[0]
    return module in {"botocore", "aiobotocore", "boto3", "aiohttp", "google", "gcsfs", "s3fs", "fsspec", "urllib3"}


def read_bytes(where: Location, start: int | None = None, end: int | None = None) -> bytes:
    """The bytes of a file or object (``start``/``end``: only that range, one ranged read on a store)."""
    if isinstance(where, Path):
        with open(where, "rb") as f:
            f.seek(start or 0)
            return f.read() if end is None else f.read(end - (start or 0))
    fs, path = where.fs_path()
    with storage_errors(where):
        return fs.cat_file(path, start=start, end=end)


def read_many(urls: list[str], end: int) -> list[bytes | None]:
    """The first ``end`` bytes of each object in ``urls``, fetched concurrently (one ranged GET each, on the
    client's event loop, not one after another); ``None`` for an object that could not be read, which the caller
    reads again on its own to name the failure."""
    found: list[bytes | None] = [None] * len(urls)
    groups: dict[int, tuple[fsspec.AbstractFileSystem, list[int], list[str]]] = {}  # one per filesystem
    for i, url in enumerate(urls):
        fs, path = filesystem(url)
        _, positions, paths = groups.setdefault(id(fs), (fs, [], []))
        positions.append(i)
        paths.append(path)
    for fs, positions, paths in groups.values():
        try:
            got = fs.cat_ranges(paths, [0] * len(paths), [end] * len(paths), on_error="return")
        except Exception:  # noqa: BLE001 - the one-by-one reads that follow name what went wrong
            continue
        for i, data in zip(positions, got):
            found[i] = data if isinstance(data, bytes) else None
    return found


def write_bytes(where: Location, data: bytes) -> None:
    """Write a whole file: atomically by rename on this machine, by one PUT in object storage."""
    if isinstance(where, Path):
        atomic_write_bytes(where, data)
        return
    fs, path = where.fs_path()
    with storage_errors(where):
        fs.pipe_file(path, data)


@contextmanager
def committed(where: Location, *, suffix: str = "") -> Iterator[Path | BinaryIO]:
    """Somewhere to write a whole file that appears at ``where`` only when the block ends without an error: a
    temporary path beside it on this machine (``ornis.utils.fs.atomic_path``), an in-memory buffer sent as one PUT
    in object storage. Writers that take either (``pq.write_table``, ``np.save`` through ``open_for_write``) write
    to what it yields."""
    if isinstance(where, Path):
        with atomic_path(where, suffix=suffix) as tmp:
            yield tmp
        return
    buffer = io.BytesIO()
    yield buffer
    write_bytes(where, buffer.getvalue())


@contextmanager
def open_for_write(target: Path | BinaryIO) -> Iterator[BinaryIO]:
    """A binary file to write to from what ``committed`` yielded."""
    if isinstance(target, Path):
        with open(target, "wb") as f:
            yield f
    else:
        yield target


def open_input(where: Location, block_size: int | None = None) -> BinaryIO:
    """A seekable binary file to read; in object storage reads fetch ranges of ``block_size`` bytes ahead (the
    reader's pattern decides how much of the object is ever fetched: nothing is copied whole first)."""
    if isinstance(where, Path):
        return open(where, "rb")  # noqa: SIM115 - the caller closes it
    fs, path = where.fs_path()
    with storage_errors(where):
        kwargs: dict[str, Any] = {"cache_type": "readahead"}
        if block_size is not None:
            kwargs["block_size"] = block_size
        return fs.open(path, "rb", **kwargs)


def read_jsonl(where: Location) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (blank lines skipped); ``[]`` when it does not exist."""
    try:
        text = read_bytes(where).decode()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def write_jsonl(where: Location, rows: list[dict[str, Any]]) -> None:
    """Write one JSON object a line as a whole file (see ``write_bytes``)."""
    write_bytes(where, "".join(json.dumps(r) + "\n" for r in rows).encode())


def list_names(folder: Location) -> list[str]:
    """The names of the files (objects) directly in ``folder``, fresh from the store; ``[]`` when there is none."""
    if isinstance(folder, Path):
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    fs, path = folder.fs_path()
    with storage_errors(folder):
        try:
            entries = fs.ls(path, detail=True, refresh=True)
        except FileNotFoundError:
            return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries if e.get("type") == "file")


def remove(where: Location) -> None:
    """Remove a file or object if it exists."""
    if isinstance(where, Path):
        where.unlink(missing_ok=True)
        return
    fs, path = where.fs_path()
    with storage_errors(where):
        try:
            fs.rm_file(path)
        except FileNotFoundError:
            pass


def remove_tree(where: Location) -> None:
    """Remove a folder (or every object under a prefix) if it exists."""
    if isinstance(where, Path):
        shutil.rmtree(where, ignore_errors=True)
        return
    fs, path = where.fs_path()
    with storage_errors(where):
        try:
            fs.rm(path, recursive=True)
        except FileNotFoundError:
            pass
