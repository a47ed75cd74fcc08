"""Progress bars on stderr, from ``tqdm``: shown when stderr is a terminal unless the caller says otherwise."""

from __future__ import annotations

import sys
from typing import Any

from tqdm.auto import tqdm


def progress_enabled(progress: bool | None) -> bool:
    """``progress`` when given, else on when stderr is a terminal."""
    if progress is not None:
        return bool(progress)
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


def progress_bar(total: int | None, *, desc: str, unit: str = "it", enabled: bool | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr with rate and ETA (``unit="B"`` scales bytes to kB / MB). ``enabled=None``: on when stderr
    is a terminal. A disabled bar accepts the same calls and draws nothing, so callers never branch on it."""
    options: dict[str, Any] = {"unit_scale": True, "unit_divisor": 1024} if unit == "B" else {}
    options.update(kwargs)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=not progress_enabled(enabled),
        file=sys.stderr,
        dynamic_ncols=True,
        **options,
    )
