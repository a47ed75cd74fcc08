"""DINOv2 self-distillation (Oquab et al., 2023) as a recipe of the shared loop, and its library entry point
``train_dino_v2``.

Each step: two global and N local crops per image; the teacher (EMA of the student) scores the unmasked global
crops, its class-token and masked-patch scores become targets by softmax centring (or Sinkhorn-Knopp, given
enough rows) at the teacher temperature; the student sees masked global crops and the local crops and is trained
on ``dino_weight * DINO + ibot_weight * iBOT + koleo_weight * KoLeo``. The defaults are DINOv2's early-training
stabilisers scaled to the run (``DinoV2Config``, ``DINO_V2_OPTIM``): teacher-temperature warm-up over 30 % of the
steps, prototypes frozen for the first epoch (lr 0 for their group), lr warm-up, weight-decay cosine, clipping
per module. Each step logs the collapse diagnostics (target entropy and largest probability, cross-view
agreement, teacher momentum); a DINO loss still at ln K after the warm-up is warned about once, and so is a rising
KoLeo term (class tokens crowding together: a collapse). Backbones with a range of patch sizes (FlexiViT) draw one
per step. Any backbone with ``MaskedTokenRetention`` trains (ViT, FlexiViT, HieraDet). The exported checkpoint is
the teacher's backbone in the published format, as DINOv2 releases are.

Everything random is a function of the run seed and the step or sample (crops: the sample's seed, masks: a seed
drawn with the crops, patch size: the step), so a resumed run and a run split over processes repeat the numbers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import random
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ornis.errors import OrnisError
from ornis.models.base import Encoder
from ornis.models.capabilities import MaskedTokenRetention, require
from ornis.train.config import OptimDefaults, Recipe, TrainConfig, TrainResult
from ornis.train.data import SampleDataset, open_source
from ornis.train.dino_v2.centering import (
    LogitQueue,
    SoftmaxCentering,
    check_centering,
    collapse_diagnostics,
    sinkhorn_knopp,
    teacher_temperature,
    view_correlation,
)
from ornis.train.dino_v2.losses import dino_loss, ibot_loss, koleo_loss
from ornis.train.dino_v2.meta_arch import HeadConfig, SelfDistillationNet, ema_update, make_teacher, teacher_momentum
from ornis.train.dino_v2.multicrop import (
    GLOBAL_VIEWS,
    MultiCropConfig,
    MultiCropTransform,
    collate_views,
    mask_rng,
    sample_masks,
)
from ornis.train.dino_v2.presets import SMALL_IMAGES_CROPS
from ornis.train.dino_v2.watch import CollapseWatch
from ornis.train.loop import run
from ornis.train.optim import GroupTag, param_groups
from ornis.train.start import Positions, start_encoder
from ornis.utils.distributed import world_size
from ornis.weights.checkpoint import Checkpoint, checkpoint_from_model

log = logging.getLogger("ornis.train")


@dataclass(frozen=True)
class DinoV2Config:
    """The method's settings: DINOv2's published recipe, scaled to the run (the loop's are in ``TrainConfig``;
    its optimisation defaults for this recipe are ``DINO_V2_OPTIM``).

    Centring: softmax centring (DINO / DINOv2's default config, Birder's) works at any batch. Sinkhorn-Knopp caps
    every target probability near N / K (N teacher rows balanced together, K prototypes), which at small batches
    overrides the teacher's sharpening and leaves the DINO loss at ln K; it is accepted only when the global batch's
    teacher rows plus the queue reach the prototypes: ``2 x batch_size + sinkhorn_queue_size x processes >= out_dim``.
    """

    heads: HeadConfig = field(default_factory=HeadConfig)
    student_temp: float = 0.1
    teacher_temp: float = 0.07
    warmup_teacher_temp: float = 0.04
    warmup_teacher_temp_steps: int | None = None  # None: warmup_teacher_temp_fraction of the steps
    warmup_teacher_temp_fraction: float = 0.3  # DINOv2: 30 of 100 epochs
    centering: Literal["sinkhorn_knopp", "softmax"] = "softmax"
    sinkhorn_iterations: int = 3
    sinkhorn_queue_size: int = 0  # rows of earlier teacher outputs joining Sinkhorn-Knopp (small batches); 0: none
    center_momentum: float = 0.9  # softmax centring's EMA
    dino_weight: float = 1.0
    ibot_weight: float = 1.0
    koleo_weight: float = 0.1
    koleo_eps: float = 1e-8
    mask_probability: float = 0.5  # share of global views that get an iBOT mask
    mask_ratio: tuple[float, float] = (0.1, 0.5)  # of the patch grid, drawn per masked view
    momentum_teacher: float = 0.992  # rises to 1 along half a cosine over the run
    freeze_last_layer_steps: int | None = None  # prototypes at lr 0 for these first steps; None: one epoch
    patch_embed_lr_scale: float = 0.2  # DINOv2's lr multiplier of the patch embedding
    continue_layer_decay: float = 0.9  # layer-wise lr decay when continuing from a checkpoint (TrainConfig's wins)
    collapse_warn_steps: int | None = None  # warn when the DINO loss is still ~ln K after these; None: temp warm-up
    patch_sizes: tuple[int, ...] | None = None  # FlexiViT: the sizes to draw from (default: all that fit the crops)

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ValueError(f"DinoV2Config.mask_probability must be in [0, 1], got {self.mask_probability}")
        low, high = self.mask_ratio
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(
                f"DinoV2Config.mask_ratio must be (low, high) with 0 <= low <= high <= 1, got {self.mask_ratio}"
            )


# DINOv2's optimisation: lr 4e-3 x sqrt(B / 1024), 10 % warm-up (10 of 100 epochs), weight decay cosine 0.04 -> 0.4,
# clip 3.0 per module (backbone and heads apart), AdamW (0.9, 0.999)
DINO_V2_OPTIM = OptimDefaults(
    base_lr=4e-3,
    lr_scaling="sqrt",
    reference_batch=1024,
    warmup_fraction=0.1,
    weight_decay=0.04,
    weight_decay_end=0.4,
    betas=(0.9, 0.999),
    grad_clip=3.0,
    clip_per_module=True,
)


class DinoV2Recipe(Recipe):
    """Student (``model``, trained) and EMA teacher (recipe state) over one backbone."""

    name = "dino-v2"
    optim_defaults = DINO_V2_OPTIM
    best_metric = "knn_top1"  # with --eval-knn: <tag>_best.pt, and a warning when it falls far below its best

    def __init__(
        self,
        backbone: Encoder,
        config: DinoV2Config | None = None,
        crops: MultiCropConfig | None = None,
        rgb_stats: dict[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        require(backbone, MaskedTokenRetention, "DINOv2 training")
        if backbone.num_classes:
            backbone.reset_classifier(0)  # the heads replace the classifier; the export carries none
        self.config = config or DinoV2Config()
        self.crops = crops or MultiCropConfig()
        self.rgb_stats = rgb_stats
        self.seed = seed
        self.model = SelfDistillationNet(backbone, self.config.heads)
        self.teacher = make_teacher(self.model)
        out_dim = self.config.heads.out_dim
        self.centering = nn.ModuleDict(
            {
                "dino": SoftmaxCentering(out_dim, self.config.center_momentum),
                "ibot": SoftmaxCentering(out_dim, self.config.center_momentum),
            }
        )
        size = self.config.sinkhorn_queue_size
        self.queues = (
            nn.ModuleDict({"dino": LogitQueue(size, out_dim), "ibot": LogitQueue(size, out_dim)}) if size else None
        )
        self.patch_sizes = self._patch_sizes(backbone)
        size = (self.crops.global_size, self.crops.global_size)
        self.mask_grids = {p or 0: backbone.retention_grid(size, p) for p in (self.patch_sizes or [None])}
        # the schedules' lengths in steps, set by ``setup`` once the run's length is known
        self.total_steps, self.freeze_steps, self.temp_warmup_steps = 1, 0, 0
        self.world = 1
        c = self.config
        mild = all(getattr(self.crops, name) == value for name, value in SMALL_IMAGES_CROPS.items())
        self.watch = CollapseWatch(out_dim, c.student_temp, c.teacher_temp, c.centering, mild)

    @property
    def encoder(self) -> nn.Module:
        """The student's backbone."""
        return self.model.backbone

    def _patch_sizes(self, backbone: Encoder) -> list[int] | None:
        """The backbone's patch sizes (FlexiViT's range) that tile both crop sizes; None for a fixed stem, whose
        coarsest stride the crops must then be multiples of (``ValueError`` otherwise, before any step)."""
        if backbone.patch_size_range is None:
            self.crops.check_stride(backbone.max_stride, backbone.name)
            return None
        smallest, largest = backbone.patch_size_range
        wanted = self.config.patch_sizes or range(smallest, largest + 1)
        sizes = [p for p in wanted if self.crops.global_size % p == 0 and self.crops.local_size % p == 0]
        if not sizes:
            raise ValueError(
                f"no patch size in {list(wanted)} divides both the global ({self.crops.global_size}) and the local "
                f"({self.crops.local_size}) crop size"
            )
        return sizes

    def patch_size_at(self, step: int) -> int | None:
        """The step's FlexiViT patch size: one draw per step from (seed, step), the same on every rank."""
        if self.patch_sizes is None:
            return None
        return random.Random(f"patch:{self.seed}:{step}").choice(self.patch_sizes)

    # -- the loop's hooks -------------------------------------------------------------------------------------
    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        """Student, teacher, centres and queues to ``device``; the schedules scaled to the run's length."""
        if cfg.fsdp:
            # the EMA would have to run shard by shard against an equally sharded teacher; not written yet
            raise OrnisError("dino-v2 runs with DDP only; fsdp=True is not supported for this recipe")
        c = self.config
        self.world = world_size()
        check_centering(c.centering, c.heads.out_dim, cfg.batch_size * GLOBAL_VIEWS, c.sinkhorn_queue_size, self.world)
        for module in (self.model, self.teacher, self.centering, self.queues):
            if module is not None:
                module.to(device)
        self.total_steps = cfg.steps
        self.freeze_steps = self.steps_per_epoch if c.freeze_last_layer_steps is None else c.freeze_last_layer_steps
        self.temp_warmup_steps = _or(c.warmup_teacher_temp_steps, int(c.warmup_teacher_temp_fraction * cfg.steps))
        self.watch.after = _or(c.collapse_warn_steps, max(self.temp_warmup_steps, 1))

    def param_groups(self, cfg: TrainConfig) -> list[dict[str, Any]]:
        """DINOv2's groups: weight decay on every matrix (position embeddings too; not biases and norms), the patch
        embedding at ``patch_embed_lr_scale``, the prototype layers at lr 0 for the first ``freeze_steps``."""
        patch = self.model.patch_embedding_parameters()
        last = GroupTag("last_layer", frozen_until=self.freeze_steps)
        stem = GroupTag("patch_embed", lr_scale=self.config.patch_embed_lr_scale)

        def tag(name: str) -> GroupTag | None:
            return last if ".last_layer." in name else stem if name in patch else None

        return param_groups(self.model, cfg.weight_decay, cfg.layer_decay, declared_no_decay=False, tags=tag)

    def collate(self, samples: list[Any]) -> dict[str, torch.Tensor]:
        """Views stacked view-major, and the iBOT masks of every patch size the step may draw (``masks_<p>``, 0 for
        a fixed stem), built here in the loader's workers rather than in the loss."""
        views = [s[0] for s in samples]
        batch = collate_views(views)
        seeds = [v["mask_seed"] for v in views]
        for p, grid in self.mask_grids.items():
            batch[f"masks_{p}"] = self.masks(seeds, grid)
        return batch

    def masks(self, mask_seeds: list[int], grid: tuple[int, int]) -> torch.Tensor:
        """(G*B, h*w) bool, view-major like the global crops; each sample's masks a function of its seed."""
        cfg = self.config
        per_sample = [
            sample_masks(grid, GLOBAL_VIEWS, mask_rng(seed), cfg.mask_probability, cfg.mask_ratio)
            for seed in mask_seeds
        ]
        return torch.stack(per_sample, dim=1).flatten(0, 1)

    def _targets(self, kind: str, teacher_logits: torch.Tensor, temp: float) -> torch.Tensor:
        if self.config.centering == "softmax":
            return self.centering[kind](teacher_logits, temp)
        queue = self.queues[kind] if self.queues is not None else None
        extra = queue.contents() if queue is not None else None
        probs = sinkhorn_knopp(teacher_logits, temp, self.config.sinkhorn_iterations, extra_logits=extra)
        if queue is not None:
            queue.push(teacher_logits.float())
        return probs

    def loss(
        self, model: nn.Module, batch: dict[str, torch.Tensor], step: int
    ) -> tuple[torch.Tensor, dict[str, float | torch.Tensor]]:
        """DINO + iBOT + KoLeo of one micro-batch (module docstring), and the collapse diagnostics."""
        cfg = self.config
        global_crops, local_crops = batch["global_crops"], batch["local_crops"]
        patch_size = self.patch_size_at(step)
        masks = batch[f"masks_{patch_size or 0}"]
        num_masked = masks.sum(dim=1, keepdim=True).clamp_min(1)
        patch_weights = (1.0 / num_masked).expand_as(masks)[masks]
        temp = teacher_temperature(step, self.temp_warmup_steps, cfg.warmup_teacher_temp, cfg.teacher_temp)

        with torch.no_grad():
            teacher = self.teacher(global_crops, None, masks, patch_size, mask_input=False)
            dino_targets = self._targets("dino", teacher.global_logits, temp)
            ibot_targets = self._targets("ibot", teacher.masked_patch_logits, temp)

        student = model(global_crops, local_crops, masks, patch_size, True)
        student_views = list(student.global_logits.chunk(GLOBAL_VIEWS))
        if student.local_logits is not None:
            student_views += list(student.local_logits.chunk(self.crops.local_crops))
        teacher_views = list(dino_targets.chunk(GLOBAL_VIEWS))
        loss_dino = dino_loss(student_views, teacher_views, cfg.student_temp)
        loss_ibot = ibot_loss(
            student.masked_patch_logits, ibot_targets, patch_weights, masks.shape[0], cfg.student_temp
        )
        loss_koleo = sum(koleo_loss(e, cfg.koleo_eps) for e in student.global_embedding.chunk(GLOBAL_VIEWS))
        loss = cfg.dino_weight * loss_dino + cfg.ibot_weight * loss_ibot + cfg.koleo_weight * loss_koleo
        logs: dict[str, float | torch.Tensor] = {
            "dino": loss_dino.detach(),
            "ibot": loss_ibot.detach(),
            "koleo": loss_koleo.detach(),
            "teacher_temp": temp,
            "teacher_momentum": teacher_momentum(step, self.total_steps, cfg.momentum_teacher),
            "masked_patches": masks.sum().float(),
            "view_correlation": view_correlation(teacher.global_logits, GLOBAL_VIEWS),
            **collapse_diagnostics(student_views[:GLOBAL_VIEWS], teacher_views),
        }
        if patch_size is not None:
            logs["patch_size"] = float(patch_size)
        return loss, logs

    def on_log(self, entry: dict[str, float], step: int) -> None:
        """Warn once of each sign of trouble: uniform targets, class tokens crowding together (``CollapseWatch``)."""
        self.watch(entry, step)

    def after_step(self, step: int) -> None:
        """The teacher follows the student."""
        ema_update(self.teacher, self.model, teacher_momentum(step, self.total_steps, self.config.momentum_teacher))

    def state_dict(self) -> dict[str, Any]:
        """Teacher, centres and queues."""
        state = {
            "teacher": _cpu(self.teacher.state_dict()),
            "centering": _cpu(self.centering.state_dict()),
        }
        if self.queues is not None:
            state["queues"] = _cpu(self.queues.state_dict())
            state["queue_processes"] = self.world
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.teacher.load_state_dict(state["teacher"])
        self.centering.load_state_dict(state["centering"])
        if self.queues is not None:
            saved = int(state.get("queue_processes", 1)) if "queues" in state else 0
            if saved != 1 or self.world != 1:
                # the states file holds one process's queue: loading it into every rank would not be exact
                raise OrnisError(
                    f"dino-v2 resume: the Sinkhorn-Knopp queue of a {saved or 'queue-less'}-process run cannot be "
                    f"restored into a {self.world}-process one (only the first process's queue is saved); resume "
                    "multi-process runs with --centering softmax or --sinkhorn-queue-size 0"
                )
            self.queues.load_state_dict(state["queues"])

    def eval_encoder(self) -> nn.Module:
        """The teacher's backbone: what is exported."""
        return self.teacher.backbone

    def export_checkpoint(self) -> Checkpoint:
        """The teacher's backbone, as DINOv2 releases are."""
        return checkpoint_from_model(self.teacher.backbone, class_to_idx={}, rgb_stats=self.rgb_stats)


def _or(value: int | None, default: int) -> int:
    return default if value is None else value


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in state.items()}


class DinoV2Views(MultiCropTransform):
    """The multi-crop views plus the seed of the sample's iBOT masks, drawn under the sample's seed like the crops."""

    def __call__(self, image: Any) -> dict[str, Any]:
        """The multi-crop views plus ``mask_seed``, an int in [0, 2**62) drawn from torch's global RNG."""
        out: dict[str, Any] = super().__call__(image)
        out["mask_seed"] = int(torch.randint(0, 2**62, ()))
        return out


# -- library entry point -------------------------------------------------------------------------------------------
@dataclass
class DinoV2Options:
    """What ``train_dino_v2`` builds; the loop's settings are a separate ``TrainConfig``."""

    data: str | os.PathLike | list[str]  # a folder of images (any layout, no labels), a .tar shard or a folder of them
    weights: str | os.PathLike | None = None  # continue pretraining a published name or a checkpoint file
    arch: str | None = None  # or an architecture from scratch
    model_config: dict[str, Any] | None = None  # architecture overrides (from scratch), e.g. {"drop_path_rate": 0.1}
    # from scratch: position embeddings start as a 2-D sine-cosine table (see ``start_encoder``); at std 0.02 a random
    # ViT pools a small image into little more than a bag of its patches (the README's digits runs: a higher k-NN
    # peak; the DINO term still at ln K)
    positions: Positions = "sincos"
    method: DinoV2Config = field(default_factory=DinoV2Config)
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)


def build_backbone(opts: DinoV2Options) -> tuple[Encoder, dict[str, Any]]:
    """The backbone to pretrain (from a checkpoint, or fresh at the global crop size) and its rgb stats. A
    checkpoint keeps its own size: the position embeddings are interpolated to the crops per call."""
    size = opts.crops.global_size if opts.weights is None else None
    started = start_encoder(opts.weights, opts.arch, size, opts.model_config, positions=opts.positions)
    return started.encoder, started.rgb_stats


def train_dino_v2(opts: DinoV2Options, cfg: TrainConfig) -> TrainResult:
    """Pretrain (or continue pretraining) a backbone with DINOv2 on an unlabelled image collection."""
    if opts.weights is not None and cfg.layer_decay is None and opts.method.continue_layer_decay < 1:
        cfg = dataclasses.replace(cfg, layer_decay=opts.method.continue_layer_decay)
    torch.manual_seed(cfg.seed)  # the heads' initialisation, the same on every rank
    backbone, rgb_stats = build_backbone(opts)
    recipe = DinoV2Recipe(backbone, opts.method, opts.crops, rgb_stats, seed=cfg.seed)
    dataset = SampleDataset(open_source(opts.data, labelled=False), DinoV2Views(opts.crops, rgb_stats))
    return run(recipe, dataset, cfg)
