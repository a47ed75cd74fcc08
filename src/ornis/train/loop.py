"""The one training loop every recipe runs on.

A recipe (``supervised.py``, ``mim.py``, ``dino_v2.py``) is a ``Recipe`` subclass: it owns the trainable module
and says how a batch becomes a loss; this loop owns everything else::

    recipe = ClassifyRecipe(...)                       # builds its modules (seed first for a reproducible init)
    dataset = SampleDataset(source, transform)         # ornis.train.data: map-style, keyed by SampleKey
    result = run(recipe, dataset, TrainConfig(steps=1000, batch_size=256, lr=1e-3, output_dir="runs/x"))
    result.losses, result.checkpoint                   # per-step losses; the published-format file

What the loop does, in order, each optimizer step: reseed the RNGs from (seed, step, rank); for each of
``grad_accum`` micro-batches, move the batch to the device, run ``recipe.loss`` under bf16 autocast (if asked),
backward (DDP syncs on the last micro-batch only); clip; set the lr of every group from the warm-up + cosine
schedule; step AdamW; update the EMA (if ``ema_decay``); call ``recipe.after_step``; log; checkpoint.

Data order. ``batch_size`` is the *global* batch of one optimizer step, over all ranks and micro-batches. The
samples form an endless stream: epoch e is ``randperm(len(dataset))`` drawn from ``seed + e``, and step s takes
stream positions ``[s * batch_size, (s + 1) * batch_size)``; rank r takes its contiguous slice of that, micro-batch
m the m-th part of the slice. Every sample is fetched as ``dataset[SampleKey(index, seed)]`` where the seed is a
function of (run seed, stream position), so augmentations are the same whatever the number of ranks or workers.
The data is therefore a pure function of the step: resume simply starts the stream at the saved step, and one
process with batch B sees the very same images as two processes with B / 2 each.

Randomness inside a step (mixup, masks, drop-path, multi-crop choices made in ``loss``) comes from the global torch
RNG, which the loop reseeds from (seed, step, rank) before every step: a resumed run draws the same numbers as an
uninterrupted one without restoring generator states (the states file still records them, for inspection).

Files (``output_dir``): ``<tag>_s<step>.pt`` is the model in the published format (``recipe.export_checkpoint()``;
``ornis.load_pretrained_model(path)`` and ``ornis embed`` read it), with ``<tag>_s<step>_ema.pt`` beside it when an
EMA is kept; ``<tag>_s<step>_states.pt`` is the training state (trainable module, optimizer, schedule position,
EMA, recipe state, RNG states; tensors and plain data only, read back with ``weights_only=True``); at the end
``<tag>.pt`` is the final model. ``log.jsonl`` has one line per logged step. ``tag`` is ``recipe.tag``.

Distributed: start with ``torchrun --nproc-per-node N ...``; the loop initialises the process group (NCCL on GPU,
gloo on CPU), wraps ``recipe.model`` in DDP, and writes files from rank 0. ``fsdp=True`` shards the model with
FSDP2 (``fully_shard`` on every transformer block, then the root) instead, for models too big for one GPU's memory
(ViT-L and up); it needs CUDA and is not exercised by the CPU tests. With FSDP the published-format files are
gathered from the shards, but no states file is written (no resume), and EMA is not supported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import time
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from ornis.errors import CheckpointFormatError, OrnisError
from ornis.train.optim import ModelEMA, cosine_lr, param_groups
from ornis.weights.checkpoint import Checkpoint, make_signature, write_checkpoint

log = logging.getLogger("ornis.train")

STATES_SUFFIX = "_states.pt"


@dataclass
class TrainConfig:
    """Everything the loop needs besides the recipe and the data. Learning rates are for the global batch."""

    steps: int
    batch_size: int  # global: all ranks and all accumulation micro-batches of one optimizer step together
    output_dir: str | os.PathLike | None = None  # None: nothing is written (tests, dry runs)
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.05
    layer_decay: float | None = None  # lr of block i is lr * layer_decay ** (num_blocks + 1 - layer_id)
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max global grad norm; None to turn off
    grad_accum: int = 1
    bf16: bool = False  # autocast the forward passes to bfloat16 (on CPU too)
    ema_decay: float | None = None  # keep an EMA of recipe.model and export it beside the model
    checkpoint_every: int = 0  # 0: only at the end
    log_every: int = 10
    seed: int = 0
    resume: bool | str | os.PathLike = False  # True: latest states file in output_dir; or a states file's path
    stop_at: int | None = None  # stop (with a checkpoint) after this many steps, e.g. to fit a job's time limit
    device: str | None = None  # default: cuda:LOCAL_RANK when CUDA is there, else cpu
    num_workers: int = 0
    fsdp: bool = False
    compile: bool = False  # torch.compile the trainable module


class SampleKey(NamedTuple):
    """How the loop asks a dataset for a sample: which one, and the seed its random augmentation must use."""

    index: int
    seed: int


class Recipe:
    """What a training method provides. Subclasses set ``model`` and ``tag`` and implement ``loss`` and
    ``export_checkpoint``; the rest has defaults.

    ``model``: the trainable ``nn.Module`` — what the optimizer steps, DDP/FSDP wraps and the states file saves.
    Anything the recipe needs in the forward pass with gradients must live inside it (e.g. MIM's decoder, DINO's
    student heads); modules without gradients (an EMA teacher) are recipe state.
    """

    name: str = "recipe"  # the method: "classify", "mim", "dino-v2"
    model: nn.Module
    find_unused_parameters: bool = False  # DDP: set when some parameters may get no gradient in a step

    @property
    def tag(self) -> str:
        """File-name stem of the checkpoints: ``<network>_<method>``, the reference's naming."""
        return f"{getattr(self.encoder, 'name', 'model')}_{self.name}"

    @property
    def encoder(self) -> nn.Module:
        """The ornis encoder being trained (for the default ``tag``)."""
        return self.model

    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        """Called once before the optimizer is made: move modules (teacher too) to ``device``, read ``cfg``."""
        self.model.to(device)

    def param_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        """AdamW groups: by default weight decay off for biases, norms, tokens; layer-wise lr decay if asked."""
        return param_groups(self.model, cfg.weight_decay, cfg.layer_decay)

    def collate(self, samples: list[Any]) -> Any:
        return default_collate(samples)

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The loss of one micro-batch (already on the device) and extra numbers to log. Call ``model(...)``, the
        wrapped module the loop passes in, for every forward pass with gradients, never ``self.model``: under DDP
        only the wrapper's forward synchronises the gradients."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (``step`` is the 0-based index of the step just taken)."""

    def state_dict(self) -> dict[str, Any]:
        """Recipe-owned state besides ``model`` (an EMA teacher, a loss centre): tensors and plain data only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def export_checkpoint(self) -> Checkpoint:
        """The encoder as a published-format checkpoint (``ornis.weights.checkpoint``)."""
        raise NotImplementedError


def encoder_checkpoint(net: nn.Module, class_to_idx: dict[str, int] | None = None,
                       rgb_stats: dict[str, Any] | None = None) -> Checkpoint:
    """An ornis encoder as a published-format checkpoint: its state, signature, classes, rgb stats, architecture
    name, and the config fields that differ from the registered variant's (so the file rebuilds the same model)."""
    from ornis.weights.checkpoint import DEFAULT_RGB_STATS
    from ornis.models.registry import get_model_spec, list_models

    name = getattr(net, "name", None)
    num_classes = int(getattr(net, "num_classes", 0))
    config = None
    if name in list_models() and dataclasses.is_dataclass(getattr(net, "config", None)):
        registered = get_model_spec(name).config
        config = {f.name: getattr(net.config, f.name) for f in dataclasses.fields(net.config)
                  if getattr(net.config, f.name) != getattr(registered, f.name)} or None
    return Checkpoint(
        state={k: _full(v).detach().cpu().clone() for k, v in net.state_dict().items()},
        signature=make_signature(net.size, num_classes),
        class_to_idx=dict(class_to_idx) if class_to_idx is not None else {str(i): i for i in range(num_classes)},
        rgb_stats={k: list(v) for k, v in (rgb_stats or DEFAULT_RGB_STATS).items()},
        task=getattr(net, "task", "image_classification"),
        config=config,
        network=name,
    )


def _full(t: torch.Tensor) -> torch.Tensor:
    """A whole tensor from an FSDP-sharded one (a collective: every rank must call it); others as they are."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@dataclass
class TrainResult:
    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (mean over ranks), for the steps run
    logs: list[dict[str, float]] = field(default_factory=list)  # every step's logged numbers
    checkpoint: Path | None = None  # the final published-format model
    states: Path | None = None  # the last states file written


# -- distributed ---------------------------------------------------------------------------------------------------
def _init_distributed() -> tuple[int, int]:
    """(rank, world size); starts the process group when launched by torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _pick_device(cfg: TrainConfig) -> torch.device:
    if cfg.device is not None:
        return torch.device(cfg.device)
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _wrap(model: nn.Module, cfg: TrainConfig, device: torch.device, recipe: Recipe) -> nn.Module:
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        if not dist.is_initialized():
            raise OrnisError("fsdp=True needs a distributed launch (torchrun)")
        for name, module in model.named_modules():
            # the repeated transformer blocks: numbered children of "block(s)" / "stage<k>" containers
            parent = name.rsplit(".", 1)[0] if "." in name else ""
            if re.search(r"(^|\.)(blocks?|stage\d+)$", parent) and name.rsplit(".", 1)[-1].isdigit():
                fully_shard(module)
        fully_shard(model)
        return model
    if dist.is_initialized():
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=recipe.find_unused_parameters)
    return model


def _mean_over_ranks(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


# -- data order ----------------------------------------------------------------------------------------------------
def _mix(*parts: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so nearby (seed, position) pairs give unrelated seeds."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class StepBatches(torch.utils.data.Sampler):
    """Yields, for steps ``start..steps-1``, this rank's micro-batches as lists of ``SampleKey`` (see the module
    docstring for the order)."""

    def __init__(self, size: int, cfg: TrainConfig, start: int, end: int, rank: int, world: int) -> None:
        per_rank, rest = divmod(cfg.batch_size, world * cfg.grad_accum)
        if rest or per_rank == 0:
            raise ValueError(
                f"batch_size {cfg.batch_size} must be a multiple of ranks x grad_accum = {world} x {cfg.grad_accum}"
            )
        if size == 0:
            raise OrnisError("the training dataset is empty")
        self.size, self.cfg, self.start, self.end = size, cfg, start, end
        self.rank, self.world, self.micro = rank, world, per_rank
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.size, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))}
        return self._perms[epoch]

    def keys(self, step: int, micro: int) -> list[SampleKey]:
        first = step * self.cfg.batch_size + (self.rank * self.cfg.grad_accum + micro) * self.micro
        out = []
        for pos in range(first, first + self.micro):
            epoch, i = divmod(pos, self.size)
            out.append(SampleKey(int(self._perm(epoch)[i]), _mix(self.cfg.seed, pos)))
        return out

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for step in range(self.start, self.end):
            for micro in range(self.cfg.grad_accum):
                yield self.keys(step, micro)

    def __len__(self) -> int:
        return max(0, self.end - self.start) * self.cfg.grad_accum


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        moved = [_to_device(v, device) for v in batch]
        return type(batch)(*moved) if hasattr(batch, "_fields") else type(batch)(moved)
    return batch


# -- states files --------------------------------------------------------------------------------------------------
def _rng_states() -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "numpy": np.random.get_state()[1].tolist()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def find_latest_states(output_dir: str | os.PathLike) -> Path | None:
    """The states file of the highest step in ``output_dir``, or None."""
    found = []
    for p in Path(output_dir).glob(f"*_s*{STATES_SUFFIX}"):
        m = re.search(r"_s(\d+)" + re.escape(STATES_SUFFIX) + "$", p.name)
        if m:
            found.append((int(m.group(1)), p))
    return max(found)[1] if found else None


def _save_states(path: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe,
                 ema: ModelEMA | None, cfg: TrainConfig) -> None:
    cfg_dict = {k: (str(v) if isinstance(v, os.PathLike) else v) for k, v in dataclasses.asdict(cfg).items()}
    obj = {
        "step": step,  # the number of optimizer steps taken
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "recipe": recipe.state_dict(),
        "ema": ema.state_dict() if ema is not None else None,
        "config": json.loads(json.dumps(cfg_dict, default=str)),
        "rng": _rng_states(),
    }
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _load_states(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is reported with the file's name
        raise CheckpointFormatError(path, f"cannot be read as a training states file ({str(e).splitlines()[0][:200]})") from None


# -- the loop ------------------------------------------------------------------------------------------------------
def run(recipe: Recipe, dataset: Dataset, cfg: TrainConfig) -> TrainResult:
    """Train ``recipe`` on ``dataset`` (indexed by ``SampleKey``) for ``cfg.steps`` optimizer steps."""
    rank, world = _init_distributed()
    device = _pick_device(cfg)
    out_dir = Path(cfg.output_dir) if cfg.output_dir is not None else None
    is_main = rank == 0
    if cfg.fsdp and cfg.ema_decay:
        raise OrnisError("ema_decay is not supported with fsdp=True")

    recipe.setup(cfg, device)
    model = recipe.model
    optimizer = torch.optim.AdamW(recipe.param_groups(cfg), lr=cfg.lr, betas=cfg.betas, weight_decay=0.0)
    ema = ModelEMA(model, cfg.ema_decay) if cfg.ema_decay else None

    start = 0
    states_path: Path | None = None
    if cfg.resume:
        if cfg.resume is True:
            if out_dir is None or (states_path := find_latest_states(out_dir)) is None:
                raise OrnisError(f"resume: no *{STATES_SUFFIX} file in {out_dir}")
        else:
            states_path = Path(cfg.resume)
        states = _load_states(states_path)
        saved = states.get("config", {})
        for key in ("batch_size", "seed", "steps"):  # these decide the data order and the lr schedule
            if key in saved and saved[key] != getattr(cfg, key):
                raise OrnisError(f"resume: {states_path} was written with {key}={saved[key]}, this run has "
                                 f"{key}={getattr(cfg, key)}; resume needs the same value")
        model.load_state_dict(states["model"])
        optimizer.load_state_dict(states["optimizer"])
        recipe.load_state_dict(states["recipe"])
        if ema is not None and states.get("ema") is not None:
            ema.load_state_dict(states["ema"])
        start = int(states["step"])
        log.info("resumed from %s at step %d", states_path, start)

    wrapped = _wrap(model, cfg, device, recipe)
    forward_model = torch.compile(wrapped) if cfg.compile else wrapped
    end = min(cfg.steps, cfg.stop_at) if cfg.stop_at is not None else cfg.steps
    sampler = StepBatches(len(dataset), cfg, start, end, rank, world)
    loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=recipe.collate, num_workers=cfg.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if cfg.bf16 else nullcontext()
    base_lrs = [g.get("lr_scale", 1.0) for g in optimizer.param_groups]
    if out_dir is not None and is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    result = TrainResult()
    model.train()
    batches = iter(loader)
    t0, images_since = time.perf_counter(), 0
    for step in range(start, end):
        _seed_step(cfg.seed, step, rank)
        lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.min_lr, cfg.warmup_steps)
        for group, scale in zip(optimizer.param_groups, base_lrs):
            group["lr"] = lr * scale
        total = torch.zeros((), device=device)
        extra: dict[str, float] = {}
        for micro in range(cfg.grad_accum):
            batch = _to_device(next(batches), device)
            last = micro == cfg.grad_accum - 1
            sync = nullcontext() if last or not hasattr(wrapped, "no_sync") else wrapped.no_sync()
            with sync:
                with autocast:
                    loss, logs = recipe.loss(forward_model, batch, step)
                (loss / cfg.grad_accum).backward()
            total += loss.detach().float() / cfg.grad_accum
            for k, v in logs.items():
                extra[k] = extra.get(k, 0.0) + float(v) / cfg.grad_accum
        if not torch.isfinite(total):
            raise OrnisError(f"step {step}: the loss is {total.item()} (not finite); lower the lr or check the data")
        grad_norm = None
        if cfg.grad_clip:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        recipe.after_step(step)

        loss_value = float(_mean_over_ranks(total))
        result.losses[step] = loss_value
        images_since += cfg.batch_size
        entry = {"step": step + 1, "loss": loss_value, "lr": lr, **extra}
        if grad_norm is not None:
            entry["grad_norm"] = grad_norm
        result.logs.append(entry)
        done = step + 1
        if cfg.log_every and (done % cfg.log_every == 0 or done == cfg.steps):
            elapsed = time.perf_counter() - t0
            entry["images_per_s"] = images_since / max(elapsed, 1e-9)
            t0, images_since = time.perf_counter(), 0
            if is_main:
                log.info("step %d/%d loss %.4f lr %.3g %.1f img/s", done, cfg.steps, loss_value, lr, entry["images_per_s"])
                if out_dir is not None:
                    with open(out_dir / "log.jsonl", "a") as f:
                        f.write(json.dumps(entry) + "\n")
        if out_dir is not None and (done == end or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0)):
            states_file = _write_checkpoints(out_dir, done, model, optimizer, recipe, ema, cfg, is_main)
            result.states = states_file if is_main and not cfg.fsdp else None

    if out_dir is not None and end == cfg.steps and (is_main or cfg.fsdp):
        ckpt = recipe.export_checkpoint()  # under FSDP every rank takes part in gathering the weights
        if is_main:
            final = out_dir / f"{recipe.tag}.pt"
            write_checkpoint(ckpt, final)
            result.checkpoint = final
    if dist.is_initialized():
        dist.barrier()
    return result


def _seed_step(seed: int, step: int, rank: int) -> None:
    s = _mix(seed, step, rank, 0x5EED)
    torch.manual_seed(s)
    random.seed(s)
    np.random.seed(s % 2**32)


def _write_checkpoints(out_dir: Path, done: int, model: nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe,
                       ema: ModelEMA | None, cfg: TrainConfig, is_main: bool) -> Path:
    stem = out_dir / f"{recipe.tag}_s{done}"
    states = Path(f"{stem}{STATES_SUFFIX}")
    if cfg.fsdp:
        # Sharded weights are gathered for the published-format file; sharded optimizer states are not written
        # (resuming an FSDP run is not supported yet)
        ckpt = recipe.export_checkpoint()
        if is_main:
            write_checkpoint(ckpt, f"{stem}.pt")
            log.warning("fsdp: wrote %s.pt; no states file (resume is not supported with FSDP yet)", stem)
        dist.barrier()
        return states
    if is_main:
        write_checkpoint(recipe.export_checkpoint(), f"{stem}.pt")
        if ema is not None:
            with ema.applied_to(model):
                write_checkpoint(recipe.export_checkpoint(), f"{stem}_ema.pt")
        _save_states(states, done, model, optimizer, recipe, ema, cfg)
    if dist.is_initialized():
        dist.barrier()
    return states


def cleanup_distributed() -> None:
    """Tear down the process group the loop started (call at the end of a torchrun script)."""
    if dist.is_initialized():
        dist.destroy_process_group()


__all__: Sequence[str] = [
    "Recipe",
    "SampleKey",
    "StepBatches",
    "TrainConfig",
    "TrainResult",
    "cleanup_distributed",
    "encoder_checkpoint",
    "find_latest_states",
    "run",
]
