"""Fetching published weights through ``huggingface_hub``, and the sha256 check before a file can be loaded.

``hf_hub_download`` does the transfer into its cache (``<ORNIS_CACHE>/hub``): the resolve protocol, mirrors
(``endpoint``), tokens, retries, resuming a cut connection with ``Range``, its own lock per file. It checks the
size, not the content, and a mirror can serve any bytes under any ETag, so ornis hashes the file it got before
anything can load it: bytes whose sha256 is not the manifest's are deleted from the hub cache (never reused) and
``ChecksumError`` names both digests; bytes that match are moved (``os.replace``, atomic) to
``<ORNIS_CACHE>/weights/<file>``, the only place ornis loads published weights from, with a ``.verified.json``
marker beside them. Moving rather than linking keeps one copy on disk that the hub cache cannot change later.

An ornis lock (``ornis.utils.locks.file_lock``) on ``<ORNIS_CACHE>/.locks/<file>.lock`` spans the download, the
check and the move: a second process waits, then finds the verified file and fetches nothing.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ornis.errors import ChecksumError, WeightsNotFoundError
from ornis.utils.fs import atomic_write_json
from ornis.utils.locks import file_lock
from ornis.utils.progress import progress_enabled
from ornis.weights.checkpoint import sha256_file
from ornis.weights.hub import HubFile, check_url, hub_failure, unreachable
from ornis.weights.manifest import WeightsFile

LIBRARY_NAME = "ornis"  # in the User-Agent huggingface_hub sends


def lock_path(dst: Path) -> Path:
    """The lock that serialises fetching ``dst``: in a ``.locks`` folder beside ``dst``'s folder (the cache root,
    for cached weights), so that the weights folder holds only weights and their markers."""
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


# -- fetch -------------------------------------------------------------------------------------------------------
def fetch(source: HubFile, dst: Path, expected: WeightsFile, *, hub_cache: Path, progress: bool | None = None) -> Path:
    """Bring ``source`` to ``dst``, verified, unless a verified copy is already there; returns ``dst``.

    A copy already in the hub cache ``hub_cache`` is checked and used without a network request. Raises
    ``WeightsNotFoundError`` when the file cannot be had (unreachable, 404, retries spent), naming the URL and where
    to put the file by hand, and ``ChecksumError`` when the bytes do not match ``expected.sha256`` (they are
    deleted: nothing is left to load). ``progress``: a progress bar on stderr (default: when stderr is a terminal).
    """
    dst = Path(dst)
    check_url(source.url)
    with file_lock(lock_path(dst)):
        if _already_verified(dst, expected.sha256) or adopt_from_hub_cache(source, dst, expected, hub_cache):
            return dst
        why = unreachable(source.endpoint)
        if why is not None:
            raise WeightsNotFoundError(unavailable(source, dst, expected, why))
        _forget_abandoned(source, expected, hub_cache)
        pointer = _download(source, dst, expected, hub_cache, progress)
        _accept(pointer, dst, expected, source.url)
    return dst


def adopt_from_hub_cache(source: HubFile, dst: Path, expected: WeightsFile, hub_cache: Path) -> bool:
    """Move a copy of ``source`` that the hub cache already holds (an earlier run stopped before the move, or a
    ``hf download --cache-dir``) to ``dst`` if its sha256 is the manifest's; a wrong copy is deleted. No network.
    The caller holds ``dst``'s lock."""
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(source.repo_id, source.filename, cache_dir=hub_cache, revision=source.revision)
    if not isinstance(cached, str):  # None, or the marker of a file known not to exist
        return False
    try:
        _accept(Path(cached), dst, expected, f"the hub cache ({cached})")
    except ChecksumError:
        return False  # deleted: a fresh download follows
    return True


def _already_verified(dst: Path, sha256: str) -> bool:
    """Whether ``dst`` holds the published bytes (another process may have fetched them while this one waited)."""
    if not dst.is_file():
        return False
    if marker_matches(dst, sha256):
        return True
    if sha256_file(dst) != sha256:
        return False
    write_marker(dst, sha256)
    return True


def _download(source: HubFile, dst: Path, expected: WeightsFile, hub_cache: Path, progress: bool | None) -> Path:
    """``hf_hub_download`` into the hub cache; the snapshot path it returns, or ``WeightsNotFoundError``."""
    # Imported here: `import ornis` and the offline demo never pay for the HTTP stack
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, XetDownloadError

    try:
        with _without_telemetry():
            pointer = hf_hub_download(
                repo_id=source.repo_id,
                filename=source.filename,
                revision=source.revision,
                endpoint=source.endpoint,
                cache_dir=hub_cache,
                library_name=LIBRARY_NAME,
                tqdm_class=_bar_class(dst.name, progress),
            )
    except (httpx2.HTTPError, EntryNotFoundError, XetDownloadError, OSError, ValueError) as e:
        raise WeightsNotFoundError(unavailable(source, dst, expected, hub_failure(e, source))) from None
    return Path(pointer)


@contextmanager
def _without_telemetry() -> Iterator[None]:
    """huggingface_hub (2.x) builds its User-Agent with a GET of ``{HF_ENDPOINT}/api/agent-harnesses`` once a day,
    to huggingface.co even when the weights come from a mirror. ornis asks the network for the file and nothing
    else, so its downloads run as under ``HF_HUB_DISABLE_TELEMETRY=1`` (a setting huggingface_hub reads at import;
    the flag is restored afterwards)."""
    from huggingface_hub import constants

    before = constants.HF_HUB_DISABLE_TELEMETRY
    constants.HF_HUB_DISABLE_TELEMETRY = True
    try:
        yield
    finally:
        constants.HF_HUB_DISABLE_TELEMETRY = before


def _accept(pointer: Path, dst: Path, expected: WeightsFile, origin: str) -> None:
    """Hash the hub cache's file behind ``pointer``; move it to ``dst`` and mark it verified if it is the published
    one, else delete it (file and snapshot entry) and raise ``ChecksumError``."""
    blob = Path(os.path.realpath(pointer))
    digest = sha256_file(blob)
    if digest != expected.sha256:
        _discard(pointer, blob)
        raise ChecksumError(
            f"{dst.name}: the bytes downloaded from {origin} have sha256 {digest}, expected {expected.sha256}; "
            "the file was discarded (a corrupt mirror or a changed upstream file?)"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(blob, dst)
    except OSError as e:
        if e.errno != errno.EXDEV:
            raise
        # weights/ on another file system than hub/: copy beside dst, then rename (still atomic for readers)
        incoming = dst.with_name(dst.name + ".incoming")
        shutil.copyfile(blob, incoming)
        os.replace(incoming, dst)
        blob.unlink()
    _discard(pointer, blob)  # the snapshot entry now points at nothing
    write_marker(dst, digest)


def _discard(pointer: Path, blob: Path) -> None:
    """Delete a file from the hub cache: its blob and the snapshot entry that names it."""
    for p in (pointer, blob):
        if p.is_symlink() or p.exists():
            p.unlink()


def _forget_abandoned(source: HubFile, expected: WeightsFile, hub_cache: Path) -> None:
    """Delete the partial files a killed download left in the hub cache. huggingface_hub (2.x) writes each download
    to a temporary name unique to the process and deletes it on failure, but a killed process cannot; such a file
    is never resumed and would stay forever. The hub names the blobs of large files by their sha256, so these are
    ``<sha256>.<id>.incomplete``; the caller's lock means no ornis process is writing one now."""
    blobs = source.folder_in(hub_cache) / "blobs"
    for part in blobs.glob(f"{expected.sha256}.*.incomplete"):
        part.unlink(missing_ok=True)


def _bar_class(desc: str, enabled: bool | None) -> type:
    """A tqdm class for ``hf_hub_download``'s progress bar, shown under ornis's rule (``enabled``, else when stderr
    is a terminal) and named after the file rather than its URL."""
    from tqdm.auto import tqdm

    show = progress_enabled(enabled)

    class FileBar(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.update(desc=desc, disable=not show, file=sys.stderr, unit_divisor=1024, dynamic_ncols=True)
            super().__init__(*args, **kwargs)

    return FileBar


def unavailable(source: HubFile, dst: Path, expected: WeightsFile, reason: str) -> str:
    """The one-line message for a file that cannot be downloaded: why, and how to put it in place by hand."""
    return (
        f"{dst.name}: cannot download {source.url}: {reason}. Without network, fetch {source.filename} of the "
        f"Hugging Face repository {source.repo_id} elsewhere (about {expected.size_mb:.1f} MB, sha256 "
        f"{expected.sha256}) and put it at {dst}, or set ORNIS_BASE_URL to a mirror"
    )
