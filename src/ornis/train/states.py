"""Training states files (``<tag>_s<step>_states.pt``): what resuming needs, written and read back.

A states file holds the trainable module, the optimizer, the schedule position (the number of steps taken), the EMA,
the recipe's own state and the RNG states (for inspection: the loop reseeds every step), as tensors and plain data
only, so it reads back with ``weights_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ornis.errors import CheckpointFormatError, OrnisError, first_line
from ornis.train.config import Recipe, TrainConfig
from ornis.train.optim import ModelEMA
from ornis.utils.fs import atomic_path

log = logging.getLogger("ornis.train")

STATES_SUFFIX = "_states.pt"
# Settings that decide the data order and the lr schedule: a resumed run must have the same
RESUME_MUST_MATCH = ("batch_size", "seed", "steps")


def states_path(out_dir: Path, tag: str, step: int) -> Path:
    """Where the states file of ``step`` goes."""
    return out_dir / f"{tag}_s{step}{STATES_SUFFIX}"


def find_latest_states(output_dir: str | os.PathLike) -> Path | None:
    """The states file of the highest step in ``output_dir``, or None."""
    found = []
    for p in Path(output_dir).glob(f"*_s*{STATES_SUFFIX}"):
        m = re.search(r"_s(\d+)" + re.escape(STATES_SUFFIX) + "$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def save_states(
    path: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe: Recipe,
    ema: ModelEMA | None,
    cfg: TrainConfig,
) -> None:
    """Write the states file of a run after ``step`` optimizer steps."""
    cfg_dict = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(cfg).items()}
    obj = {
        "step": step,  # the number of optimizer steps taken
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "recipe": recipe.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "config": json.loads(json.dumps(cfg_dict, default=str)),
        "run": {"recipe": recipe.name, "tag": recipe.tag},  # what resuming checks first
        "rng": _rng_states(),
    }
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_states(path: Path) -> dict[str, Any]:
    """A states file's contents; ``CheckpointFormatError`` naming the file when it cannot be read."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file's name
        raise CheckpointFormatError(path, f"cannot be read as a training states file ({first_line(e, 200)})") from None


def _check_same_run(path: Path, states: dict[str, Any], recipe: Recipe, model: nn.Module) -> None:
    """``OrnisError`` in one line when the states file is another recipe's or another architecture's."""
    run = states.get("run", {})
    if run.get("recipe", recipe.name) != recipe.name or run.get("tag", recipe.tag) != recipe.tag:
        raise OrnisError(
            f"resume: {path} is a {run.get('recipe')} run of {run.get('tag')}, this is a {recipe.name} run of "
            f"{recipe.tag}; resume with the same recipe and architecture, or start a new --output"
        )
    saved = states.get("model")
    if not isinstance(saved, dict):
        raise CheckpointFormatError(path, "holds no model state: not a training states file")
    ours = model.state_dict()
    missing = sorted(set(ours) - set(saved))
    unexpected = sorted(set(saved) - set(ours))
    shapes = sorted(k for k in set(ours) & set(saved) if tuple(ours[k].shape) != tuple(saved[k].shape))
    if missing or unexpected or shapes:
        first = (missing or unexpected or shapes)[0]
        raise OrnisError(
            f"resume: {path} was written by another model ({len(missing)} tensors missing, {len(unexpected)} "
            f"unexpected, {len(shapes)} of another shape, e.g. {first!r}); resume with the same architecture and "
            "settings, or start a new --output"
        )


def resume(
    cfg: TrainConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    recipe: Recipe,
    ema: ModelEMA | None,
) -> int:
    """Restore a run from the states file ``cfg.resume`` names (True: the latest in ``cfg.output_dir``); returns the
    number of steps already taken (0 when not resuming)."""
    if not cfg.resume:
        return 0
    if cfg.resume is True:
        found = find_latest_states(cfg.output_dir) if cfg.output_dir is not None else None
        if found is None:
            raise OrnisError(f"resume: no *{STATES_SUFFIX} file in {cfg.output_dir}")
        path = found
    else:
        path = Path(cfg.resume)
    states = load_states(path)
    _check_same_run(path, states, recipe, model)
    saved = states.get("config", {})
    for key in RESUME_MUST_MATCH:
        if key in saved and saved[key] != getattr(cfg, key):
            raise OrnisError(
                f"resume: {path} was written with {key}={saved[key]}, this run has {key}={getattr(cfg, key)}; "
                "resume needs the same value"
            )
    model.load_state_dict(states["model"])
    try:
        optimizer.load_state_dict(states["optimizer"])
    except ValueError as e:
        raise OrnisError(f"resume: {path}: its optimizer state does not fit this run ({first_line(e, 200)})") from None
    recipe.load_state_dict(states["recipe"])
    if ema is not None and states.get("ema") is not None:
        ema.load_state_dict(states["ema"])
    start = int(states["step"])
    log.info("resumed from %s at step %d", path, start)
    return start
