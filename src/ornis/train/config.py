"""What a training run is made of: the loop's settings (``TrainConfig``), what a method provides (``Recipe``) and
what a run gives back (``TrainResult``)."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn
from torch.utils.data import default_collate

from ornis.train.optim import param_groups
from ornis.weights.checkpoint import Checkpoint


@dataclass(frozen=True)
class OptimDefaults:
    """A recipe's optimisation defaults: what a ``TrainConfig`` field left at ``None`` becomes (``resolve``).

    ``base_lr`` is for ``reference_batch`` images and is scaled to the run's batch by ``lr_scaling`` ("linear":
    MAE's lr x B / 256, "sqrt": DINOv2's lr x sqrt(B / 1024), "none"). ``warmup_fraction`` of the steps warm the lr
    up; the weight decay follows half a cosine from ``weight_decay`` to ``weight_decay_end`` (DINOv2's 0.04 -> 0.4;
    None: constant). ``clip_per_module`` clips each top-level module's gradient norm on its own (DINOv2: backbone and
    heads apart, so the large prototype layer does not dominate one global norm)."""

    base_lr: float = 1e-3
    lr_scaling: Literal["none", "linear", "sqrt"] = "none"
    reference_batch: int = 256
    warmup_fraction: float = 0.0
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0  # 0: off
    clip_per_module: bool = False

    def lr_for(self, batch_size: int) -> float:
        """``base_lr`` scaled to a global batch of ``batch_size``."""
        ratio = batch_size / self.reference_batch
        return self.base_lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]

    def describe(self) -> str:
        """One line for ``--help``: what the defaults of this recipe are."""
        scale = {"none": "", "linear": f" x B/{self.reference_batch}", "sqrt": f" x sqrt(B/{self.reference_batch})"}
        wd = f"{self.weight_decay:g}" + (f" -> {self.weight_decay_end:g} (cosine)" if self.weight_decay_end else "")
        clip = "off" if not self.grad_clip else f"{self.grad_clip:g}" + (" per module" if self.clip_per_module else "")
        return (
            f"lr {self.base_lr:g}{scale[self.lr_scaling]}, warm-up {self.warmup_fraction:.0%} of the steps, "
            f"weight decay {wd}, betas {self.betas[0]:g}/{self.betas[1]:g}, clip {clip}"
        )


@dataclass
class TrainConfig:
    """Everything the loop needs besides the recipe and the data. Learning rates are for the global batch.

    Fields left at ``None`` take the recipe's published defaults (``Recipe.optim_defaults``, see ``resolve``). These
    defaults are also the ``ornis train`` command's."""

    steps: int
    batch_size: int = 256  # global: all ranks and all accumulation micro-batches of one optimizer step together
    output_dir: str | os.PathLike | None = None  # None: nothing is written (tests, dry runs)
    lr: float | None = None  # None: the recipe's base lr scaled to batch_size
    min_lr: float = 1e-6
    warmup_steps: int | None = None  # None: the recipe's share of the steps
    weight_decay: float | None = None
    weight_decay_end: float | None = None  # cosine schedule of the weight decay towards this (None: the recipe's)
    layer_decay: float | None = None  # lr of layer group i is lr * layer_decay ** (last group - i)
    betas: tuple[float, float] | None = None
    grad_clip: float | None = None  # max grad norm; 0 turns clipping off
    clip_per_module: bool | None = None  # clip every top-level module of the recipe's model on its own
    grad_accum: int = 1
    bf16: bool = False  # autocast the forward passes to bfloat16 (on CPU too)
    ema_decay: float | None = None  # keep an EMA of recipe.model and export it beside the model
    checkpoint_every: int = 0  # 0: only at the end
    log_every: int = 10
    seed: int = 0
    resume: bool | str | os.PathLike = False  # True: latest states file in output_dir; or a states file's path
    stop_at: int | None = None  # stop (with a checkpoint) after this many steps, e.g. to fit a job's time limit
    device: str | None = None  # default: cuda:LOCAL_RANK when CUDA is there, else cpu
    # data-loader processes decoding and augmenting (0: in the training process); None: as many as the CPUs allow
    # (``ornis.utils.distributed.default_num_workers``), as the batch runner does
    num_workers: int | None = None
    fsdp: bool = False
    compile: bool = False  # torch.compile the trainable module
    grad_checkpointing: bool = False  # recompute the encoders' blocks in the backward pass (memory for compute)
    eval_knn: tuple[str | os.PathLike, str | os.PathLike] | None = None  # labelled (train, val) folders for k-NN
    eval_every: int = 0  # steps between evaluations (k-NN, a recipe's validation); 0: at the end only
    progress: bool | None = None  # a progress line with ETA on stderr; None: when stderr is a terminal
    tensorboard: str | os.PathLike | None = None  # also write the logged numbers as TensorBoard events here

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            _check(name, getattr(self, name), 1)
        for name in ("log_every", "checkpoint_every", "seed", "eval_every"):
            _check(name, getattr(self, name), 0)
        for name in ("warmup_steps", "stop_at", "num_workers"):
            if getattr(self, name) is not None:
                _check(name, getattr(self, name), 0)
        for name in ("lr", "min_lr", "weight_decay", "weight_decay_end", "grad_clip"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, (int, float)) and value >= 0 and math.isfinite(value)):
                raise ValueError(f"TrainConfig.{name} must be a finite number >= 0, got {value!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be above 0, got {self.lr!r}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ValueError(f"TrainConfig.layer_decay must be in (0, 1], got {self.layer_decay!r}")
        if self.ema_decay is not None and not 0 < self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be in (0, 1), got {self.ema_decay!r}")
        if self.betas is not None and (len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas)):
            raise ValueError(f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas!r}")

    def resolve(self, defaults: OptimDefaults) -> TrainConfig:
        """This config with every ``None`` optimisation field set from ``defaults``, scaled to the run."""
        d = defaults
        return dataclasses.replace(
            self,
            lr=self.lr if self.lr is not None else d.lr_for(self.batch_size),
            warmup_steps=self.warmup_steps if self.warmup_steps is not None else int(d.warmup_fraction * self.steps),
            weight_decay=self.weight_decay if self.weight_decay is not None else d.weight_decay,
            weight_decay_end=_first(self.weight_decay_end, d.weight_decay_end if self.weight_decay is None else None),
            betas=tuple(self.betas) if self.betas is not None else d.betas,
            grad_clip=self.grad_clip if self.grad_clip is not None else d.grad_clip,
            clip_per_module=self.clip_per_module if self.clip_per_module is not None else d.clip_per_module,
        )


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def _check(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"TrainConfig.{name} must be an integer >= {minimum}, got {value!r}")


@dataclass
class TrainResult:
    """What ``run`` gives back."""

    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (mean over ranks), for the steps run
    logs: list[dict[str, float]] = field(default_factory=list)  # every step's logged numbers
    checkpoint: Path | None = None  # the final published-format model
    states: Path | None = None  # the last states file written
    best: Path | None = None  # <tag>_best.pt (rank 0), when a best_metric was measured


class Recipe:
    """What a training method provides. Subclasses set ``model`` and ``name`` and implement ``loss`` and
    ``export_checkpoint``; the rest has defaults.

    ``model``: the trainable ``nn.Module`` — what the optimizer steps, DDP/FSDP wraps and the states file saves.
    Anything the recipe needs in the forward pass with gradients must live inside it (e.g. MIM's decoder, DINO's
    student heads); modules without gradients (an EMA teacher) are recipe state.
    """

    name: str = "recipe"  # the method: "classify", "mim", "dino-v2"
    model: nn.Module
    find_unused_parameters: bool = False  # DDP: set when some parameters may get no gradient in a step
    optim_defaults: ClassVar[OptimDefaults] = OptimDefaults()  # what TrainConfig's None fields become
    best_metric: str | None = None  # a key of ``evaluate``'s numbers: the loop keeps <tag>_best.pt at its highest
    steps_per_epoch: int = 1  # set by the loop before ``setup``: optimizer steps per pass over the data

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
        """AdamW groups: weight decay off for biases, norms and what the modules declare (``no_weight_decay``);
        layer-wise lr decay if asked."""
        return param_groups(self.model, cfg.weight_decay, cfg.layer_decay)

    def eval_encoder(self) -> nn.Module:
        """The encoder whose embeddings evaluation measures (k-NN during training): what ``export_checkpoint``
        writes. Default: ``encoder``."""
        return self.encoder

    def evaluate(self, device: torch.device) -> dict[str, float]:
        """Numbers measured every ``eval_every`` steps and at the end, on every process (a validation set is
        sharded over them), with the EMA weights in ``model`` when an EMA is kept. Default: none."""
        return {}

    def on_log(self, entry: dict[str, float], step: int) -> None:
        """Called on the main process with each logged step's numbers (e.g. to warn of a collapse)."""

    def collate(self, samples: list[Any]) -> Any:
        """Samples -> the batch ``loss`` receives (default: ``torch.utils.data.default_collate``)."""
        return default_collate(samples)

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """The loss of one micro-batch (already on the device) and extra numbers to log (floats or 0-d tensors:
        the loop reads tensors back once per step, not once per micro-batch). Call ``model(...)``, the
        wrapped module the loop passes in, for every forward pass with gradients, never ``self.model``: under DDP
        only the wrapper's forward synchronises the gradients."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """Called after every optimizer step (``step`` is the 0-based index of the step just taken)."""

    def state_dict(self) -> dict[str, Any]:
        """Recipe-owned state besides ``model`` (an EMA teacher, a loss centre): tensors and plain data only."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""

    def export_checkpoint(self) -> Checkpoint:
        """The encoder as a published-format checkpoint (``ornis.weights.checkpoint.checkpoint_from_model``)."""
        raise NotImplementedError
