"""Where published weights live on disk, and how a name becomes a file.

Settings (argument > environment variable > default); ``ornis.weights.hub`` maps them onto ``huggingface_hub``'s:
- cache folder: ``ORNIS_CACHE`` (default ``$XDG_CACHE_HOME/ornis`` or ``~/.cache/ornis``): verified files under
  ``weights/``, huggingface_hub's cache (downloads in progress, locks) under ``hub/``;
- mirror: ``ORNIS_BASE_URL`` is the hub endpoint (``HF_ENDPOINT`` when it is unset);
- offline: ``ORNIS_OFFLINE=1`` or ``HF_HUB_OFFLINE=1`` never touches the network.

A file is used by name only if its sha256 is the manifest's: the check runs once, and a small
``<file>.verified.json`` beside it records the size and mtime it was made at, so a 1 GB file is not re-hashed on
every load (``verify_cached`` / ``ornis models verify`` re-hash regardless). A checkpoint that is not in the
manifest's hash list loads only from an explicit local path.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from ornis.errors import ChecksumError, WeightsNotFoundError
from ornis.utils.locks import file_lock
from ornis.weights import download, hub
from ornis.weights.checkpoint import sha256_file
from ornis.weights.manifest import DEFAULT_FILE_FORMAT, MANIFEST, PretrainedWeights, WeightsFile, get_weights


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The cache folder: ``override``, else ``ORNIS_CACHE``, else ``$XDG_CACHE_HOME/ornis`` or ``~/.cache/ornis``."""
    if override:
        return Path(override).expanduser()
    if os.environ.get("ORNIS_CACHE"):
        return Path(os.environ["ORNIS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ornis"


def _cache_setting(override: str | os.PathLike | None) -> str:
    """How the user chose the cache folder, for an error message to name."""
    if override:
        return f"the cache folder {Path(override).expanduser()} (--cache / cache_dir=)"
    if os.environ.get("ORNIS_CACHE"):
        return f"ORNIS_CACHE={os.environ['ORNIS_CACHE']}"
    return f"the default cache folder {cache_dir()} (set ORNIS_CACHE to choose another)"


def require_cache(override: str | os.PathLike | None = None, *, writable: bool = True) -> Path:
    """The cache root; ``WeightsNotFoundError`` in one line naming the setting (``ORNIS_CACHE``, ``--cache``) and
    the path when a file stands where the cache folder should be, or (``writable``: a download is coming, whose
    ``weights`` and lock folders are made here) when this process cannot write it."""
    root = cache_dir(override)
    in_the_way = next((p for p in (root, *root.parents) if p.exists() and not p.is_dir()), None)
    why = f"{in_the_way} is a file, not a folder" if in_the_way is not None else None
    if why is None and writable:
        folders = (root / "weights", hub_cache_dir(root), download.lock_path(root / "weights" / "x").parent)
        try:
            for folder in folders:
                folder.mkdir(parents=True, exist_ok=True)
            unwritable = [f for f in folders if not os.access(f, os.W_OK | os.X_OK)]
            why = f"{unwritable[0]} is not writable" if unwritable else None
        except OSError as e:
            why = f"{e.filename or root} cannot be made ({e.strerror or e})"
    if why is not None:
        raise WeightsNotFoundError(
            f"{_cache_setting(override)}: the weights cache cannot be used: {why}; "
            "point ORNIS_CACHE (or --cache) at a writable folder"
        )
    return root


def hub_cache_dir(root: Path) -> Path:
    """huggingface_hub's cache (``cache_dir=``) inside the ornis cache ``root``: downloads land there first."""
    return root / "hub"


def weights_path(
    weights: PretrainedWeights, file_format: str = DEFAULT_FILE_FORMAT, cache: str | os.PathLike | None = None
) -> Path:
    """Where the cache keeps the file (present or not)."""
    return cache_dir(cache) / "weights" / weights.file_name(file_format)


def base_url_for(weights: PretrainedWeights, base_url: str | None = None) -> str:
    """The resolve base ``weights`` are fetched from (``{endpoint}/{repo}/resolve/{revision}``): the mirror
    ``base_url`` or ``ORNIS_BASE_URL``, else ``HF_ENDPOINT`` or the entry's own (see ``ornis.weights.hub.locate``)."""
    return hub.locate(weights, base_url=base_url).base


def local_file(
    weights: PretrainedWeights, file_format: str = DEFAULT_FILE_FORMAT, cache: str | os.PathLike | None = None
) -> Path:
    """Where the file is or will be: inside the package for shipped weights, else in the cache."""
    shipped = weights.extra.get("local_path")
    return Path(shipped) if shipped else weights_path(weights, file_format, cache)


def is_cached(
    weights: PretrainedWeights, file_format: str = DEFAULT_FILE_FORMAT, cache: str | os.PathLike | None = None
) -> bool:
    """Whether the file is on disk (in the cache, or shipped; its checksum is checked when it is used)."""
    return local_file(weights, file_format, cache).is_file()


def check_cached(
    path: Path,
    weights: PretrainedWeights,
    file_format: str = DEFAULT_FILE_FORMAT,
    *,
    rehash: bool = False,
    write: bool = True,
) -> None:
    """Raise ChecksumError unless the cached ``path`` has the manifest's sha256 (trusting a still-valid verified
    marker unless ``rehash``; ``write=False`` leaves no marker, for files outside the cache)."""
    expected = weights.file(file_format).sha256
    if not rehash and download.marker_matches(path, expected):
        return
    found = sha256_file(path)
    if found != expected:
        if write:
            with contextlib.suppress(OSError):  # a read-only cache keeps its stale marker; it no longer matches
                download.marker_path(path).unlink(missing_ok=True)
        raise ChecksumError(
            f"{path}: sha256 {found}, expected {expected} for {weights.name} ({file_format}); the cached file is not "
            f"the published one. Delete it (or run `ornis models download {weights.name} --force`), or load the "
            "file by its path if it is your own"
        )
    if write:
        with contextlib.suppress(OSError):  # a read-only (shared) cache still loads: it is re-hashed next time
            download.write_marker(path, expected)


def resolve_weights(
    name: str,
    file_format: str = DEFAULT_FILE_FORMAT,
    *,
    cache: str | os.PathLike | None = None,
    offline: bool | None = None,
    base_url: str | None = None,
    progress: bool | None = None,
) -> Path:
    """The verified local file of published weights ``name``, fetching it into the cache when it is missing."""
    weights = get_weights(name)
    expected = weights.file(file_format)
    if weights.extra.get("local_path"):
        # Weights shipped inside the package (ornis.assets): a few MB, hashed on every use, no marker written there
        shipped = Path(weights.extra["local_path"])
        if not shipped.is_file() or sha256_file(shipped) != expected.sha256:
            raise ChecksumError(f"{shipped}: missing, or its sha256 is not {expected.sha256} ({name}); reinstall ornis")
        return shipped
    path = weights_path(weights, file_format, cache)
    if path.is_file():
        check_cached(path, weights, file_format)
        return path
    require_cache(cache, writable=False)
    source = hub.locate(weights, file_format, base_url)
    if offline is None:
        setting = hub.offline_setting()
    else:
        setting = "offline=True" if offline else None
    if setting is not None:
        return _offline(source, path, expected, cache, setting)
    hub.check_url(source.url)  # a typo in the mirror fails before any folder is made
    require_cache(cache)
    return download.fetch(source, path, expected, hub_cache=hub_cache_dir(cache_dir(cache)), progress=progress)


def _offline(
    source: hub.HubFile, path: Path, expected: WeightsFile, cache: str | os.PathLike | None, setting: str
) -> Path:
    """``path`` from a verified copy huggingface_hub's cache already holds, or ``WeightsNotFoundError`` saying what
    to fetch and where to put it: offline, nothing else is tried."""
    root = cache_dir(cache)
    if source.folder_in(hub_cache_dir(root)).is_dir():
        require_cache(cache)
        with file_lock(download.lock_path(path)):
            if download.adopt_from_hub_cache(source, path, expected, hub_cache_dir(root)):
                return path
    raise WeightsNotFoundError(
        f"{path.name}: {path} is not in the cache and offline mode is on ({setting}); download {source.url} "
        f"({source.filename} of the Hugging Face repository {source.repo_id}, about {expected.size_mb:.1f} MB, "
        f"sha256 {expected.sha256}) and put it at {path}"
    )


def download_weights(
    name: str,
    file_format: str = DEFAULT_FILE_FORMAT,
    *,
    cache: str | os.PathLike | None = None,
    base_url: str | None = None,
    progress: bool | None = None,
    force: bool = False,
) -> Path:
    """Fetch published weights into the cache (``force``: drop a cached copy first, e.g. one that fails its
    checksum). Respects ``ORNIS_OFFLINE``."""
    weights = get_weights(name)
    path = weights_path(weights, file_format, cache)
    if force:
        require_cache(cache)
        with file_lock(download.lock_path(path)):
            path.unlink(missing_ok=True)
            download.marker_path(path).unlink(missing_ok=True)
    return resolve_weights(name, file_format, cache=cache, base_url=base_url, progress=progress)


@dataclass(frozen=True)
class CachedFile:
    """One cached file as ``verify_cached`` found it."""

    name: str
    file_format: str
    path: Path
    ok: bool
    message: str


def verify_cached(names: list[str] | None = None, *, cache: str | os.PathLike | None = None) -> list[CachedFile]:
    """Re-hash the cached files of ``names`` (default: all published weights) against the manifest. Files that are
    not cached are skipped; a bad file is reported, not deleted."""
    results = []
    for name in names or sorted(MANIFEST):
        weights = get_weights(name)
        for f in weights.files:
            path = local_file(weights, f.format, cache)
            if not path.is_file():
                continue
            try:
                check_cached(path, weights, f.format, rehash=True, write=not weights.extra.get("local_path"))
                results.append(CachedFile(name, f.format, path, True, f"sha256 {f.sha256} ok"))
            except ChecksumError as e:
                results.append(CachedFile(name, f.format, path, False, str(e)))
    return results
