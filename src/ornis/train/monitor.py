"""Where a run's numbers go: ``log.jsonl`` (one line per logged step, no duplicates after a resume), the console
log, a progress line with ETA on a terminal (``ornis.utils.progress``) and, when asked, TensorBoard events."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from ornis.errors import OrnisError
from ornis.utils.fs import atomic_write_text
from ornis.utils.progress import progress_bar

log = logging.getLogger("ornis.train")

# Shown on the console line and the progress bar when a recipe logs them
CONSOLE_KEYS = ("dino", "target_entropy", "agreement", "knn_top1", "val_top1")


def open_tensorboard(folder: str | os.PathLike) -> Any:
    """A ``SummaryWriter`` on ``folder``; ``OrnisError`` saying what to install when TensorBoard is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional: only when --tensorboard is given
    except ImportError:
        raise OrnisError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or drop --tensorboard)"
        ) from None
    return SummaryWriter(log_dir=str(folder))


def drop_later_lines(path: Path, done: int) -> int:
    """Remove the lines of ``log.jsonl`` after step ``done`` (a resumed run logs them again); returns how many."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            step = int(json.loads(line).get("step", 0))
        except (ValueError, AttributeError):
            step = 0
        if step > done:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))
    return dropped


def best_logged(path: Path, key: str | None, done: int) -> float:
    """The best ``key`` logged up to step ``done`` (what a resumed run's ``<tag>_best.pt`` holds), or -inf."""
    if key is None or not path.is_file():
        return -math.inf
    best = -math.inf
    for line in path.read_text().splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and entry.get("step", done + 1) <= done and key in entry:
            best = max(best, float(entry[key]))
    return best


# An evaluation below this share of its best, and at least MIN_FALL below it, says the run is collapsing or
# diverging, not noise: the k-NN of a few hundred held-out images moves by about 0.02-0.03 between evaluations of a
# healthy run, and near chance a small absolute wobble is a large share
FALL_RATIO = 0.8
MIN_FALL = 0.05


def fell_from_best(value: float, best: float) -> bool:
    """Whether ``value`` is below ``FALL_RATIO`` of a (finite, positive) ``best`` and at least ``MIN_FALL`` under it."""
    return math.isfinite(best) and best > 0 and value < FALL_RATIO * best and best - value >= MIN_FALL


class RunLog:
    """The logged steps of one run on the main process (every call is a no-op elsewhere)."""

    def __init__(
        self,
        out_dir: Path | None,
        is_main: bool,
        start: int,
        end: int,
        total: int,
        progress: bool | None = None,
        tensorboard: str | os.PathLike | None = None,
    ) -> None:
        self.out_dir, self.is_main, self.total = out_dir, is_main, total
        self.writer = open_tensorboard(tensorboard) if tensorboard is not None and is_main else None
        if is_main and out_dir is not None and start > 0:
            dropped = drop_later_lines(out_dir / "log.jsonl", start)
            if dropped:
                log.info("log.jsonl: dropped %d lines after step %d (logged again by this run)", dropped, start)
        self.bar = progress_bar(end - start, desc="train", unit="step", enabled=progress if is_main else False)

    def step(self) -> None:
        """One more optimizer step done (the progress line)."""
        self.bar.update(1)

    def write(self, entry: dict[str, float]) -> None:
        """Log one step's numbers: console, progress line, ``log.jsonl``, TensorBoard."""
        if not self.is_main:
            return
        shown = " ".join(f"{k} {entry[k]:.4g}" for k in CONSOLE_KEYS if k in entry)
        message = f"step {entry['step']}/{self.total} loss {entry['loss']:.4f} lr {entry['lr']:.3g}"
        if "images_per_s" in entry:
            message += f" {entry['images_per_s']:.1f} img/s"
        if self.bar.disable:
            log.info("%s%s", message, f" {shown}" if shown else "")
        else:
            self.bar.set_postfix_str(f"loss {entry['loss']:.4f}{' ' + shown if shown else ''}", refresh=False)
        if self.out_dir is not None:
            with open(self.out_dir / "log.jsonl", "a") as f:
                f.write(json.dumps(entry) + "\n")
        if self.writer is not None:
            for key, value in entry.items():
                if key != "step":
                    self.writer.add_scalar(f"train/{key}", value, entry["step"])

    def close(self) -> None:
        """Finish the progress line and flush TensorBoard."""
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
