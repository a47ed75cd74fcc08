"""Fetching published weights into the cache. (Resumable, verified download lands with the weights issue.)"""

from __future__ import annotations

from pathlib import Path

from ornis.errors import WeightsNotFoundError
from ornis.weights.manifest import WeightsFile


def fetch(url: str, dst: Path, expected: WeightsFile, *, progress: bool | None = None) -> Path:
    raise WeightsNotFoundError(
        f"{dst.name} is not in the cache and ornis cannot download yet; download {url} "
        f"(sha256 {expected.sha256}) and put it at {dst}"
    )
