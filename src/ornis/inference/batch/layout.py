"""The names of the files and folders in a batch output folder (the layout the package docstring describes)."""

from __future__ import annotations

from pathlib import Path

from ornis.utils.storage import Location

MANIFEST = "_manifest.json"
MANIFEST_LOCK = "_manifest.lock"
PLAN = "_plan.parquet"
ERRORS = "_errors.jsonl"
ERRORS_DIR = "_errors"
FEATURES_DIR = "_features"
CLAIMS_DIR = "_claims"


def part_name(shard_id: int) -> str:
    """The file name of a shard's rows: ``part-NNNNN.parquet``."""
    return f"part-{shard_id:05d}.parquet"


def errors_path(out: Location, shard_id: int) -> Location:
    """The errors of one shard: ``_errors/part-NNNNN.jsonl``."""
    return out / ERRORS_DIR / f"part-{shard_id:05d}.jsonl"


def plan_errors_path(out: Location) -> Location:
    """Inputs that could not be read while planning (an unreadable tar): ``_errors/plan.jsonl``."""
    return out / ERRORS_DIR / "plan.jsonl"


def features_path(out: Location, shard_id: int, stage: str) -> Location:
    """A shard's feature maps of ``stage``: ``_features/part-NNNNN.STAGE.npy``, rows as in its part file."""
    return out / FEATURES_DIR / f"part-{shard_id:05d}.{stage}.npy"


def is_temporary(path: Path) -> bool:  # only local folders have temporaries: an object is written by one PUT
    """A temporary file a killed run left behind (``ornis.utils.fs.atomic_path`` names them ``.NAME.PID.HEX.tmp``)."""
    return path.name.startswith(".") and ".tmp" in path.name
