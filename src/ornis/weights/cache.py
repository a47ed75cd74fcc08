"""Where published weights live on disk, and how a name becomes a file.

Settings (argument > environment variable > default):
- cache folder: ``ORNIS_CACHE`` (default ``$XDG_CACHE_HOME/ornis`` or ``~/.cache/ornis``), files under ``weights/``;
- mirror: ``ORNIS_BASE_URL`` replaces ``https://huggingface.co/birder-project/<name>/resolve/main`` (``{name}`` in it
  is filled in; without it the file name is appended);
- offline: ``ORNIS_OFFLINE=1`` never touches the network.
"""

from __future__ import annotations

import os
from pathlib import Path

from ornis.errors import WeightsNotFoundError
from ornis.weights.manifest import PretrainedWeights, get_weights


def env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in {"1", "true", "yes", "on"}


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    if override:
        return Path(override).expanduser()
    if os.environ.get("ORNIS_CACHE"):
        return Path(os.environ["ORNIS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "ornis"


def weights_path(weights: PretrainedWeights, file_format: str = "pt", cache: str | os.PathLike | None = None) -> Path:
    return cache_dir(cache) / "weights" / weights.file_name(file_format)


def base_url_for(weights: PretrainedWeights, base_url: str | None = None) -> str | None:
    base = base_url or os.environ.get("ORNIS_BASE_URL")
    if not base:
        return None
    return base.replace("{name}", weights.name) if "{name}" in base else base


def resolve_weights(
    name: str,
    file_format: str = "pt",
    *,
    cache: str | os.PathLike | None = None,
    offline: bool | None = None,
    base_url: str | None = None,
    progress: bool | None = None,
) -> Path:
    """The local file of published weights ``name``, fetching it into the cache when it is missing."""
    weights = get_weights(name)
    path = weights_path(weights, file_format, cache)
    if path.is_file():
        return path
    if offline is None:
        offline = env_flag("ORNIS_OFFLINE")
    url = weights.url(file_format, base_url_for(weights, base_url))
    if offline:
        raise WeightsNotFoundError(
            f"{name}: {path} is not in the cache and offline mode is on; download {url} "
            f"(sha256 {weights.file(file_format).sha256}) and put it at {path}"
        )
    from ornis.weights import download

    return download.fetch(url, path, weights.file(file_format), progress=progress)
