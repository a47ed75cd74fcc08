"""What a training run is made of: the loop's settings (``TrainConfig``), what a method provides (``Recipe``) and
what a run gives back (``TrainResult``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import default_collate

from ornis.train.optim import param_groups
from ornis.weights.checkpoint import Checkpoint


@dataclass
class TrainConfig:
    """Everything the loop needs besides the recipe and the data. Learning rates are for the global batch.

    These defaults are also the ``ornis train`` command's."""

    steps: int
    batch_size: int = 256  # global: all ranks and all accumulation micro-batches of one optimizer step together
    output_dir: str | os.PathLike | None = None  # None: nothing is written (tests, dry runs)
    lr: float = 1e-3
    min_lr: float = 1e-6
    warmup_steps: int = 0
    weight_decay: float = 0.05
    layer_decay: float | None = None  # lr of layer group i is lr * layer_decay ** (last group - i)
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
    # data-loader processes decoding and augmenting (0: in the training process); None: as many as the CPUs allow
    # (``ornis.utils.distributed.default_num_workers``), as the batch runner does
    num_workers: int | None = None
    fsdp: bool = False
    compile: bool = False  # torch.compile the trainable module


@dataclass
class TrainResult:
    """What ``run`` gives back."""

    losses: dict[int, float] = field(default_factory=dict)  # step -> loss (mean over ranks), for the steps run
    logs: list[dict[str, float]] = field(default_factory=list)  # every step's logged numbers
    checkpoint: Path | None = None  # the final published-format model
    states: Path | None = None  # the last states file written


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

    def collate(self, samples: list[Any]) -> Any:
        """Samples -> the batch ``loss`` receives (default: ``torch.utils.data.default_collate``)."""
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
        """Restore what ``state_dict`` returned."""

    def export_checkpoint(self) -> Checkpoint:
        """The encoder as a published-format checkpoint (``ornis.weights.checkpoint.checkpoint_from_model``)."""
        raise NotImplementedError
