"""Which runs are working in an output folder now: every process of a run (the one that prepared the folder, each
``torchrun`` rank, each Ray task) holds a shared ``flock`` on its claim attempt's lock, ``_claims/<attempt>.live``,
while it works. The kernel drops the lock when a process ends, even by SIGKILL, so a lock that cannot be taken
exclusively means a live run, and one that can means the attempt's claims are stale.

A run that finds a live attempt joins it (the two runs share its claims, so no shard is done twice and neither
loses the files it is writing); one that finds none starts a new attempt, which frees the shards the dead run had
claimed. ``_claims/<attempt>.owner`` names the run that started the attempt, for messages.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # not POSIX: no leases, every run starts a new attempt as before
    fcntl = None  # type: ignore[assignment]

LIVE_LOCK = ".live"  # suffixes of the attempt folder's name: beside it, not among its claim files
OWNER = ".owner"


def _beside(attempt_dir: Path, suffix: str) -> Path:
    return attempt_dir.with_name(attempt_dir.name + suffix)


class AttemptLease:
    """A shared lock on an attempt's ``.live`` file held until ``release`` (or the end of a ``with`` block)."""

    def __init__(self, attempt_dir: Path) -> None:
        self.path = _beside(attempt_dir, LIVE_LOCK)
        self.fd: int | None = None
        if fcntl is not None:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
            try:
                fcntl.flock(self.fd, fcntl.LOCK_SH)
            except OSError:  # a file system without locks (ENOLCK): run without a lease, as before leases
                self.release()

    def release(self) -> None:
        """Let go of the lock (closing the file drops it); a second call does nothing."""
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> AttemptLease:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def is_live(attempt_dir: Path) -> bool:
    """Whether some process holds a lease on the attempt in ``attempt_dir`` (hold no lease on it yourself)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(_beside(attempt_dir, LIVE_LOCK), os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:  # no locks on this file system: nobody can be seen working
        return False
    finally:
        os.close(fd)
    return False


def write_owner(attempt_dir: Path) -> None:
    """Record who starts the attempt in ``attempt_dir``: host and process id."""
    _beside(attempt_dir, OWNER).write_text(f"pid {os.getpid()} on host {socket.gethostname()}\n")


def owner(attempt_dir: Path) -> str:
    """Who started the attempt (``"another process"`` when it is not recorded)."""
    try:
        return _beside(attempt_dir, OWNER).read_text().strip() or "another process"
    except OSError:
        return "another process"
