"""Cross-process locks on a file, from the ``filelock`` library (``flock`` on POSIX), used by downloads and by
output folders alike."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from ornis.utils.fs import file_mode


@contextmanager
def file_lock(path: str | os.PathLike, timeout: float = -1) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created if missing, its folder too) for the block; other processes that
    ask for the same path wait. ``timeout`` seconds (default: wait forever) before ``filelock.Timeout``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path), timeout=timeout, mode=file_mode()):
        yield
