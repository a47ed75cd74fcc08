"""The one training loop every recipe runs on.

A recipe (``supervised.py``, ``mim.py``, ``dino_v2/``) is a ``Recipe`` subclass: it owns the trainable module
and says how a batch becomes a loss; this loop owns everything else::

    recipe = ClassifyRecipe(...)                       # builds its modules (seed first for a reproducible init)
    dataset = SampleDataset(source, transform)         # ornis.train.data: map-style, keyed by SampleKey
    result = run(recipe, dataset, TrainConfig(steps=1000, batch_size=256, lr=1e-3, output_dir="runs/x"))
    result.losses, result.checkpoint                   # per-step losses; the published-format file

What the loop does, in order, each optimizer step: reseed the RNGs from (seed, step, rank); for each of
``grad_accum`` micro-batches, move the batch to the device, run ``recipe.loss`` under bf16 autocast (if asked),
backward (DDP syncs on the last micro-batch only); clip; set the lr of every group from the warm-up + cosine
schedule; step AdamW; update the EMA (if ``ema_decay``); call ``recipe.after_step``; log; checkpoint.

Data order (``sampling.py``). ``batch_size`` is the *global* batch of one optimizer step, over all ranks and
micro-batches; the data is a pure function of the step, so resume simply starts the stream at the saved step, and
one process with batch B sees the very same images as two processes with B / 2 each. Randomness inside a step
comes from the global RNGs, reseeded before every step: a resumed run draws the same numbers as an uninterrupted
one without restoring generator states.

Files (``output_dir``): ``<tag>_s<step>.pt`` is the model in the published format (``recipe.export_checkpoint()``;
``ornis.load_pretrained_model(path)`` and ``ornis embed`` read it), with ``<tag>_s<step>_ema.pt`` beside it when an
EMA is kept; ``<tag>_s<step>_states.pt`` is the training state (``states.py``); at the end ``<tag>.pt`` is the
final model. ``log.jsonl`` has one line per logged step (a resumed run first drops the lines after its start).
``tag`` is ``recipe.tag``. Every ``eval_every`` steps and at the end: ``recipe.evaluate`` (on the EMA weights when
an EMA is kept) and the k-NN of ``eval_knn``; ``<tag>_best.pt`` is kept at the best ``recipe.best_metric``,
and a warning says when it falls far below that best (a collapse).

Settings left at ``None`` in ``TrainConfig`` (lr, warm-up, weight decay, betas, clipping) are the recipe's
published defaults scaled to the run (``TrainConfig.resolve``); the resolved values are logged and saved.

Distributed: start with ``torchrun --nproc-per-node N ...``; the loop joins the process group (NCCL on GPU, gloo on
CPU), wraps ``recipe.model`` in DDP, and writes files from rank 0. ``fsdp=True`` shards the model with FSDP2
instead (``wrap.py``); it needs CUDA and is not exercised by the CPU tests. With FSDP the published-format files
are gathered from the shards, but no states file is written (no resume), and EMA is not supported.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ornis.errors import OrnisError
from ornis.models.base import Encoder
from ornis.train.config import Recipe, TrainConfig, TrainResult
from ornis.train.evaluation import KnnMonitor
from ornis.train.monitor import FALL_RATIO, RunLog, best_logged, fell_from_best
from ornis.train.optim import ModelEMA, clip_gradients, cosine_lr, cosine_schedule
from ornis.train.sampling import StepBatches, seed_step
from ornis.train.states import resume, save_states, states_path
from ornis.train.wrap import wrap
from ornis.utils.distributed import (
    DistInfo,
    barrier,
    default_device,
    default_num_workers,
    init_distributed,
    mean_over_ranks,
)
from ornis.weights.checkpoint import write_checkpoint

log = logging.getLogger("ornis.train")


@dataclass
class _Session:
    """One run's moving parts, as ``run`` set them up."""

    recipe: Recipe
    cfg: TrainConfig
    dist: DistInfo
    device: torch.device
    model: nn.Module  # recipe.model: what the optimizer steps and the states file saves
    wrapped: nn.Module  # the DDP / FSDP wrapper (or model itself)
    forward_model: nn.Module  # what recipe.loss calls: wrapped, compiled if asked
    optimizer: torch.optim.Optimizer
    ema: ModelEMA | None
    out_dir: Path | None
    start: int
    end: int
    best: float = -math.inf  # the best ``recipe.best_metric`` so far
    fall_warned: bool = False  # the warning that ``recipe.best_metric`` fell far below its best was given


def run(recipe: Recipe, dataset: Dataset, cfg: TrainConfig) -> TrainResult:
    """Train ``recipe`` on ``dataset`` (indexed by ``SampleKey``) for ``cfg.steps`` optimizer steps."""
    recipe.steps_per_epoch = max(1, math.ceil(len(dataset) / cfg.batch_size))
    cfg = cfg.resolve(recipe.optim_defaults)
    s = _start(recipe, cfg)
    knn = _knn_monitor(recipe, cfg)  # every rank checks the folders, so a bad one stops them all
    sampler = StepBatches(len(dataset), cfg, s.start, s.end, s.dist.rank, s.dist.world_size)
    loader = DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=recipe.collate,
        num_workers=default_num_workers(s.device) if cfg.num_workers is None else cfg.num_workers,
        pin_memory=s.device.type == "cuda",
        persistent_workers=False,
    )
    autocast = torch.autocast(s.device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    if s.out_dir is not None and s.dist.is_main:
        s.out_dir.mkdir(parents=True, exist_ok=True)
    if s.dist.is_main:
        log.info(
            "%s: %d steps, batch %d, lr %.3g (warm-up %d steps), weight decay %.3g%s, betas %s, clip %s",
            recipe.name,
            cfg.steps,
            cfg.batch_size,
            cfg.lr,
            cfg.warmup_steps,
            cfg.weight_decay,
            f" -> {cfg.weight_decay_end:.3g}" if cfg.weight_decay_end is not None else "",
            cfg.betas,
            f"{cfg.grad_clip:g}{' per module' if cfg.clip_per_module else ''}" if cfg.grad_clip else "off",
        )
    runlog = RunLog(s.out_dir, s.dist.is_main, s.start, s.end, cfg.steps, cfg.progress, cfg.tensorboard)
    result = TrainResult()
    s.model.train()
    batches = iter(loader)
    t0, images_since = time.perf_counter(), 0
    try:
        for step in range(s.start, s.end):
            seed_step(cfg.seed, step, s.dist.rank)
            lr = _set_schedule(s, step)
            entry = _train_step(s, batches, step, autocast)
            result.losses[step] = entry["loss"]
            images_since += cfg.batch_size
            entry = {"step": step + 1, "loss": entry.pop("loss"), "lr": lr, **entry}
            result.logs.append(entry)
            done = step + 1
            runlog.step()
            rate = images_since / max(time.perf_counter() - t0, 1e-9)  # training only, not the evaluation
            measured = {}
            if done == s.end or (cfg.eval_every and done % cfg.eval_every == 0):
                measured = _evaluate(s, knn, done)
                entry.update(measured)
            if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps) or measured:
                entry["images_per_s"] = rate
                t0, images_since = time.perf_counter(), 0
                if s.dist.is_main:
                    recipe.on_log(entry, step)
                runlog.write(entry)
            if s.out_dir is not None and (done == s.end or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
                states_file = _write_checkpoints(s, done)
                result.states = states_file if s.dist.is_main and not cfg.fsdp else None
    finally:
        runlog.close()
    result.checkpoint = _write_final(s)
    result.best = _best_file(s)
    barrier()
    return result


def _knn_monitor(recipe: Recipe, cfg: TrainConfig) -> KnnMonitor | None:
    if cfg.eval_knn is None:
        return None
    train, val = cfg.eval_knn
    size = tuple(getattr(recipe.eval_encoder(), "size", (224, 224)))
    return KnnMonitor(train, val, size, getattr(recipe, "rgb_stats", None))


def _set_schedule(s: _Session, step: int) -> float:
    """Every group's lr (warm-up + cosine, times its scale; 0 while frozen) and weight decay (cosine towards
    ``weight_decay_end``) for ``step``; returns the base lr."""
    cfg = s.cfg
    lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
    wd = cfg.weight_decay
    if cfg.weight_decay_end is not None:
        wd = cosine_schedule(step, cfg.steps, cfg.weight_decay, cfg.weight_decay_end)
    for group in s.optimizer.param_groups:
        frozen = step < group.get("frozen_until", 0)
        group["lr"] = 0.0 if frozen else lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = wd * group.get("wd_scale", 1.0 if group["weight_decay"] else 0.0)
    return lr


def _evaluate(s: _Session, knn: KnnMonitor | None, done: int) -> dict[str, float]:
    """The recipe's numbers and the k-NN (rank 0) on the weights as exported; ``<tag>_best.pt`` at a new best."""
    weights = s.ema.applied_to(s.model) if s.ema is not None else nullcontext()
    with weights:
        out = dict(s.recipe.evaluate(s.device))
        if knn is not None and s.dist.is_main:
            out.update(knn(s.recipe.eval_encoder(), s.device))
        key = s.recipe.best_metric
        if key in out and s.dist.is_main and not s.fall_warned and fell_from_best(out[key], s.best):
            s.fall_warned = True
            kept = f"; {_best_name(s)} keeps the best weights" if s.out_dir is not None else ""
            log.warning(
                "step %d: %s %.4f fell below %d%% of its best %.4f: the run is collapsing or diverging (a lower "
                "--lr usually prevents it)%s",
                done,
                key,
                out[key],
                round(100 * FALL_RATIO),
                s.best,
                kept,
            )
        if key in out and s.out_dir is not None and out[key] > s.best:
            s.best = out[key]
            # under FSDP every rank takes part in gathering the sharded weights (a validation figure is on all)
            ckpt = s.recipe.export_checkpoint() if s.dist.is_main or s.cfg.fsdp else None
            if s.dist.is_main:
                write_checkpoint(ckpt, s.out_dir / _best_name(s))
                log.info("step %d: best %s %.4f, wrote %s", done, key, out[key], _best_name(s))
    s.model.train()
    barrier()
    return out


def _best_name(s: _Session) -> str:
    """The file name of the model at the best ``recipe.best_metric``."""
    return f"{s.recipe.tag}_best.pt"


def _best_file(s: _Session) -> Path | None:
    """``<tag>_best.pt`` on rank 0 when a best was measured (by this run or the one it resumed)."""
    if not s.dist.is_main or s.out_dir is None or not math.isfinite(s.best):
        return None
    path = s.out_dir / _best_name(s)
    return path if path.is_file() else None


def _start(recipe: Recipe, cfg: TrainConfig) -> _Session:
    """Join the process group, set the recipe up on its device, make the optimizer and EMA, resume, wrap."""
    info = init_distributed()
    device = default_device(cfg.device)
    if cfg.fsdp and cfg.ema_decay:
        raise OrnisError("ema_decay is not supported with fsdp=True")
    if cfg.fsdp and cfg.eval_knn is not None:
        # the k-NN embeds on rank 0 alone, where a sharded forward needs every rank
        raise OrnisError("--eval-knn is not supported with --fsdp yet: drop one of them")
    recipe.setup(cfg, device)
    model = recipe.model
    if cfg.grad_checkpointing:
        for module in model.modules():
            if isinstance(module, Encoder):
                module.set_grad_checkpointing(True)
    # On CPU, PyTorch's default AdamW is a Python loop of ~10 kernels per tensor; the fused kernel does one pass
    # per tensor (a DINOv2 step on 2 cores: ~4x less optimizer time, benchmarks/train_step_vs_birder.py). Same
    # update, rounded differently in the last bit (tests/test_train_optim_fused.py). GPUs keep the default (foreach).
    fused = device.type == "cpu" and not cfg.fsdp
    optimizer = torch.optim.AdamW(
        recipe.param_groups(cfg), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0, fused=fused or None
    )
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay else None
    start = resume(cfg, model, optimizer, recipe, ema)
    wrapped = wrap(model, cfg, device, recipe)
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
    return _Session(
        recipe=recipe,
        cfg=cfg,
        dist=info,
        device=device,
        model=model,
        wrapped=wrapped,
        forward_model=torch.compile(wrapped) if cfg.compile else wrapped,
        optimizer=optimizer,
        ema=ema,
        out_dir=Path(cfg.output_dir) if cfg.output_dir is not None else None,
        start=start,
        end=end,
        best=best_logged(Path(cfg.output_dir) / "log.jsonl", recipe.best_metric, start)
        if start and cfg.output_dir
        else -math.inf,
    )


def _train_step(
    s: _Session, batches: Iterator[Any], step: int, autocast: AbstractContextManager[Any]
) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches: forward, backward, clip, step, EMA, ``after_step``.
    Returns the step's loss (mean over ranks) and the recipe's numbers (mean over micro-batches), read back from
    the device once."""
    cfg = s.cfg
    total = torch.zeros((), device=s.device)
    extra: dict[str, Any] = {}
    for micro in range(cfg.grad_accum):
        batch = _to_device(next(batches), s.device)
        last = micro == cfg.grad_accum - 1
        sync = nullcontext() if last or not hasattr(s.wrapped, "no_sync") else s.wrapped.no_sync()
        with sync:
            with autocast:
                loss, logs = s.recipe.loss(s.forward_model, batch, step)
            (loss / cfg.grad_accum).backward()
        total += loss.detach().float() / cfg.grad_accum
        for k, v in logs.items():
            v = v.detach().float() if isinstance(v, torch.Tensor) else float(v)
            extra[k] = extra.get(k, 0.0) + v / cfg.grad_accum
    numbers = {"loss": mean_over_ranks(total)}
    # the norm is logged whether or not it is clipped (max_norm inf: measured, left alone)
    numbers["grad_norm"] = clip_gradients(s.model, cfg.grad_clip or math.inf, bool(cfg.clip_per_module))
    tensors = {k: v for k, v in {**numbers, **extra}.items() if isinstance(v, torch.Tensor)}
    values = dict(zip(tensors, torch.stack([t.float().to(s.device) for t in tensors.values()]).cpu().tolist()))
    out = {**{k: v for k, v in extra.items() if not isinstance(v, torch.Tensor)}, **values}
    if not math.isfinite(out["loss"]):
        raise OrnisError(f"step {step}: the loss is {out['loss']} (not finite); lower the lr or check the data")
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    if s.ema is not None:
        s.ema.update(s.model)
    s.recipe.after_step(step)
    return {"loss": out.pop("loss"), **out}


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


def _write_checkpoints(s: _Session, done: int) -> Path:
    """The model (and EMA) in the published format and the states file after ``done`` steps; returns the states
    file's path (not written under FSDP)."""
    stem = s.out_dir / f"{s.recipe.tag}_s{done}"
    states = states_path(s.out_dir, s.recipe.tag, done)
    if s.cfg.fsdp:
        # Sharded weights are gathered for the published-format file; sharded optimizer states are not written
        # (resuming an FSDP run is not supported yet)
        ckpt = s.recipe.export_checkpoint()
        if s.dist.is_main:
            write_checkpoint(ckpt, f"{stem}.pt")
            log.warning("fsdp: wrote %s.pt; no states file (resume is not supported with FSDP yet)", stem)
        barrier()
        return states
    if s.dist.is_main:
        write_checkpoint(s.recipe.export_checkpoint(), f"{stem}.pt")
        if s.ema is not None:
            with s.ema.applied_to(s.model):
                write_checkpoint(s.recipe.export_checkpoint(), f"{stem}_ema.pt")
        save_states(states, done, s.model, s.optimizer, s.recipe, s.ema, s.cfg)
    barrier()
    return states


def _write_final(s: _Session) -> Path | None:
    """``<tag>.pt`` once the run has taken all its steps (not after ``stop_at``); its path on rank 0."""
    if s.out_dir is None or s.end != s.cfg.steps or not (s.dist.is_main or s.cfg.fsdp):
        return None
    ckpt = s.recipe.export_checkpoint()  # under FSDP every rank takes part in gathering the weights
    if not s.dist.is_main:
        return None
    final = s.out_dir / f"{s.recipe.tag}.pt"
    write_checkpoint(ckpt, final)
    return final


# Recipes and scripts import the records from here, beside ``run``
__all__ = ["Recipe", "TrainConfig", "TrainResult", "run"]
