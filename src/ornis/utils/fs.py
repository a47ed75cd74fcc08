"""Atomic file writes: a reader sees the old file or the new one, never a partial one.

Every file ornis writes goes through here, so every one is created with the mode the umask allows (0644 under
umask 022), like a file made by ``open(path, "w")`` and unlike one made by ``tempfile.mkstemp`` (0600).
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ornis.errors import OrnisError


def file_mode() -> int:
    """The mode a new file gets under the current umask (0o644 under umask 022)."""
    # os.umask can only be read by setting it; set it straight back
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def refuse_special(path: Path) -> None:
    """Raise ``OrnisError`` when ``path`` (links followed) exists and is not a regular file."""
    try:
        mode = path.stat().st_mode
    except (FileNotFoundError, NotADirectoryError):
        return
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a special file (device, FIFO or socket)"
        raise OrnisError(f"{path} is {kind}, not a regular file; give the path of a file to write")


@contextmanager
def atomic_path(path: str | os.PathLike, *, suffix: str | None = None, fsync: bool = False) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write to; when the block ends without an error it replaces
    ``path`` in one ``os.replace`` (atomic on one file system), otherwise it is removed.

    The temporary file already exists, empty, with the umask's mode, so writers that open it by name (``torch.save``,
    ``pq.write_table``, ``safetensors``, ONNX) keep that mode. ``suffix`` is kept at its end for writers that pick the
    format by name (default: ``path``'s own suffix). ``fsync=True`` flushes the data to disk before the rename.

    A ``path`` that exists and is not a regular file (``/dev/null``, a FIFO, a socket, a folder) is refused with
    ``OrnisError`` before anything is written: the rename would replace the special file itself.
    """
    path = Path(path)
    refuse_special(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    end = path.suffix if suffix is None else suffix
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{end}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.close(fd)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, file_mode())  # a writer that re-created the file may have set its own mode
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = False) -> Path:
    """Write ``data`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, fsync: bool = False) -> Path:
    """Write ``obj`` as JSON to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, json.dumps(obj, indent=indent), fsync=fsync)


def atomic_write_jsonl(path: str | os.PathLike, rows: list[dict[str, Any]], *, fsync: bool = False) -> Path:
    """Write one JSON object a line to ``path`` atomically; returns ``path``."""
    return atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows), fsync=fsync)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a JSON-lines file (blank lines skipped); ``[]`` when it does not exist."""
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
