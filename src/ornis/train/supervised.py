"""Supervised classification: fine-tune a released checkpoint on new classes, or train an architecture from
scratch, with the standard augmentations, and measure top-1 / top-5 on a validation folder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Subset

from ornis.models.base import Encoder
from ornis.train.config import OptimDefaults, Recipe, TrainConfig, TrainResult
from ornis.train.data import MixupCutmix, SampleDataset, eval_transform, open_source, train_transform
from ornis.train.evaluation import check_labelled
from ornis.train.loop import run
from ornis.train.start import Positions, start_encoder
from ornis.utils.distributed import all_reduce_sum, rank, world_size
from ornis.utils.fs import atomic_write_json
from ornis.weights.checkpoint import Checkpoint, checkpoint_from_model

log = logging.getLogger("ornis.train")


class ClassifyRecipe(Recipe):
    """Cross-entropy on the encoder's logits, with mixup / cutmix and label smoothing (soft targets)."""

    name = "classify"
    best_metric = "val_top1"
    # MAE's fine-tuning (ViT-L/H): lr 1e-3 x B / 256, warmed up over 5 of 50 epochs. The old default, 1e-3 at any
    # batch from the first step, took a from-scratch ViT at batch 32 to worse than its random init (k-NN 0.46 ->
    # 0.15 on the digits, validation top-1 at chance after 300 steps); this one reaches 0.39 there
    optim_defaults = OptimDefaults(base_lr=1e-3, lr_scaling="linear", reference_batch=256, warmup_fraction=0.1)

    def __init__(
        self,
        net: Encoder,
        class_to_idx: dict[str, int],
        rgb_stats: dict[str, Any],
        mixup_alpha: float = 0.0,
        cutmix_alpha: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        if net.num_classes != len(class_to_idx):
            raise ValueError(f"the network has {net.num_classes} outputs but there are {len(class_to_idx)} classes")
        self.model = net
        self.class_to_idx = dict(class_to_idx)
        self.rgb_stats = rgb_stats
        self.mix = MixupCutmix(len(class_to_idx), mixup_alpha, cutmix_alpha, label_smoothing)
        self.val: SampleDataset | None = None  # validated every eval_every steps and at the end when set
        self.val_batch_size = 64
        self.bf16 = False

    def setup(self, cfg: TrainConfig, device: torch.device) -> None:
        """The model to ``device``; validation in bf16 when training is."""
        super().setup(cfg, device)
        self.bf16 = cfg.bf16

    def evaluate(self, device: torch.device) -> dict[str, float]:
        """Top-1 / top-5 on the validation set (``val_top1``, ``val_top5``), each process scoring its share."""
        if self.val is None:
            return {}
        metrics = evaluate_topk(self.model, self.val, self.val_batch_size, device, bf16=self.bf16, sharded=True)
        log.info("validation: top-1 %.4f top-5 %.4f", metrics["top1"], metrics["top5"])
        return {f"val_{k}": v for k, v in metrics.items()}

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Soft-target cross-entropy under mixup / cutmix / label smoothing, else plain cross-entropy."""
        images, labels = batch
        if (labels < 0).any():
            raise ValueError("classification needs labelled data; found samples with no label (-1)")
        if self.mix.active or self.mix.label_smoothing:
            images, targets = self.mix(images, labels)
            logits = model(images)
            loss = torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        else:
            logits = model(images)
            loss = F.cross_entropy(logits.float(), labels)
        return loss, {}

    def export_checkpoint(self) -> Checkpoint:
        """The classifier with its classes."""
        return checkpoint_from_model(self.model, class_to_idx=self.class_to_idx, rgb_stats=self.rgb_stats)


@torch.no_grad()
def evaluate_topk(
    net: nn.Module,
    dataset: SampleDataset,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    ks: Sequence[int] = (1, 5),
    bf16: bool = False,
    sharded: bool = False,
) -> dict[str, float]:
    """Top-k accuracy (in [0, 1]) of ``net`` over ``dataset`` (plain-index ``SampleDataset``); k above the number
    of classes counts as the number of classes. ``sharded``: each process of a distributed run scores every
    world-size-th image and the counts are summed over processes."""
    was_training = net.training
    net.eval()
    device = torch.device(device)
    correct = {k: 0 for k in ks}
    total = 0
    part = Subset(dataset, range(rank(), len(dataset), world_size())) if sharded else dataset
    loader = DataLoader(part, batch_size=batch_size, shuffle=False)
    for images, labels in loader:
        images, labels = images.to(device), labels.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = net(images).float()
        top = logits.topk(min(max(ks), logits.shape[1]), dim=1).indices
        for k in ks:
            correct[k] += int((top[:, :k] == labels[:, None]).any(dim=1).sum())
        total += labels.shape[0]
    net.train(was_training)
    counts = torch.tensor([total, *(correct[k] for k in ks)], dtype=torch.float64, device=device)
    if sharded:
        all_reduce_sum(counts)
    total, *hits = counts.tolist()
    return {f"top{k}": h / max(total, 1) for k, h in zip(ks, hits)}


@dataclass
class ClassifyOptions:
    """What ``train_classifier`` builds; the loop's settings are a separate ``TrainConfig``."""

    train: str | os.PathLike | list[str]  # a folder of <class>/<image>, a .tar shard, a folder of shards
    val: str | os.PathLike | None = None
    weights: str | os.PathLike | None = None  # a published name or a checkpoint path to fine-tune from
    arch: str | None = None  # or an architecture to train from scratch
    size: int | None = None  # default: the checkpoint's / the architecture's
    model_config: dict[str, Any] | None = None  # architecture overrides (from scratch), e.g. {"drop_path_rate": 0.1}
    positions: Positions = "random"  # from scratch: "sincos" starts with a 2-D sine-cosine table (see start_encoder)
    auto_augment: str | None = "randaugment"
    crop_scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True  # off for images whose mirror is another class (digits, text)
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    label_smoothing: float = 0.1
    val_batch_size: int = 64


def build_classifier(opts: ClassifyOptions, class_to_idx: dict[str, int]) -> tuple[Encoder, dict[str, Any], int]:
    """The network to train (head sized for ``class_to_idx``), its rgb stats and its input size."""
    started = start_encoder(
        opts.weights,
        opts.arch,
        opts.size,
        opts.model_config,
        num_classes=len(class_to_idx),
        class_to_idx=class_to_idx,
        positions=opts.positions,
    )
    return started.encoder, started.rgb_stats, started.encoder.size[0]


def train_classifier(opts: ClassifyOptions, cfg: TrainConfig) -> tuple[TrainResult, dict[str, float] | None]:
    """Fine-tune (``opts.weights``) or train from scratch (``opts.arch``); returns the run's result and the
    top-1 / top-5 on ``opts.val`` at the last step (on the EMA weights when an EMA is kept; None without a
    validation set). Both sets are checked before the first step: at least two classes, no empty class folder, the
    validation classes among the training ones. With ``cfg.eval_every``, validation also runs every that many steps
    and ``<tag>_best.pt`` keeps the best top-1."""
    train_source = open_source(opts.train, labelled=True)
    check_labelled(train_source, f"training data {opts.train}")
    class_to_idx = train_source.class_to_idx
    val_source = None
    if opts.val is not None:
        val_source = open_source(opts.val, labelled=True, class_to_idx=class_to_idx)
        check_labelled(val_source, f"--val {opts.val}", class_to_idx)
    torch.manual_seed(cfg.seed)  # the new head / a from-scratch model start the same on every rank and every run
    net, rgb_stats, size = build_classifier(opts, class_to_idx)
    transform = train_transform(
        size, rgb_stats, scale=opts.crop_scale, hflip=opts.hflip, auto_augment=opts.auto_augment
    )
    recipe = ClassifyRecipe(net, class_to_idx, rgb_stats, opts.mixup_alpha, opts.cutmix_alpha, opts.label_smoothing)
    if val_source is not None:
        recipe.val = SampleDataset(val_source, eval_transform(size, rgb_stats))
        recipe.val_batch_size = opts.val_batch_size
    result = run(recipe, SampleDataset(train_source, transform), cfg)
    metrics = None
    last = result.logs[-1] if result.logs else {}
    if "val_top1" in last:
        metrics = {"top1": last["val_top1"], "top5": last["val_top5"]}
        if cfg.output_dir is not None and rank() == 0:
            atomic_write_json(Path(cfg.output_dir) / "val_metrics.json", metrics, indent=None)
    return result, metrics
