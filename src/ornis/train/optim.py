"""AdamW parameter groups (weight-decay exclusions, layer-wise lr decay), the warm-up + cosine schedule, and EMA."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

# Parameters that are positions or learned tokens, not weights: decaying them towards 0 only hurts (ViT, MAE, DINOv2)
NO_DECAY_NAMES = re.compile(r"(pos_embed|pos_embedding|class_token|cls_token|reg_tokens|register_tokens|mask_token)")
# A repeated block: a numbered child of a container called block / blocks / stage<k> (ViT: encoder.block.3,
# Hiera and HieraDet: body.stage2.1)
BLOCK_INDEX = re.compile(r"(?:^|\.)(?:blocks?|stage\d+)\.(\d+)\.")


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights, layer-scale gammas (all 1-D) and position embeddings / tokens get no weight decay."""
    return param.ndim <= 1 or bool(NO_DECAY_NAMES.search(name))


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Depth of every parameter for layer-wise lr decay, and the number of layers.

    0 is the stem (patch embedding, position embeddings, tokens: everything before the first block), block i is
    i + 1, and everything after the last block (final norm, head, decoders) is ``num_blocks + 1``. Blocks are
    numbered in the order the module lists them, so a hierarchical model's stages count as one sequence.
    """
    names = [n for n, _ in model.named_parameters()]
    block_keys: list[str] = []  # "prefix.blocks.N" in first-seen order
    for n in names:
        m = BLOCK_INDEX.search(n)
        if m:
            key = n[: m.end() - 1]
            if key not in block_keys:
                block_keys.append(key)
    depth = {key: i + 1 for i, key in enumerate(block_keys)}
    out: dict[str, int] = {}
    seen_block = False
    for n in names:
        m = BLOCK_INDEX.search(n)
        if m:
            out[n] = depth[n[: m.end() - 1]]
            seen_block = True
        else:
            out[n] = len(block_keys) + 1 if seen_block else 0
    return out, len(block_keys) + 1


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float | None = None) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: one per (decay or not, layer), each with ``lr_scale``
    (``layer_decay ** (num_layers - layer_id)``, 1 without layer decay) that the loop multiplies the lr by."""
    ids, num_layers = layer_ids(model) if layer_decay is not None else ({}, 0)
    groups: dict[tuple[bool, int], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = no_weight_decay(name, p)
        layer = ids.get(name, 0)
        key = (skip, layer)
        if key not in groups:
            scale = layer_decay ** (num_layers - layer) if layer_decay is not None else 1.0
            groups[key] = {"params": [], "weight_decay": 0.0 if skip else weight_decay, "lr_scale": scale, "names": []}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    # "names" stays in the group: the optimizer's state_dict keeps it as plain data, useful when reading one
    return [groups[k] for k in sorted(groups)]


def cosine_lr(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """Linear warm-up from ~0 to ``lr`` over ``warmup_steps``, then half a cosine down to ``min_lr`` at the end."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class ModelEMA:
    """Exponential moving average of a module's floating-point parameters and buffers:
    ``ema = decay * ema + (1 - decay) * current`` after every optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"ema decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if k in self.shadow:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)

    @contextmanager
    def applied_to(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into ``model`` (e.g. to export or evaluate them)."""
        backup = {k: v.detach().clone() for k, v in model.state_dict().items() if k in self.shadow}
        model.load_state_dict(self.shadow, strict=False)
        try:
            yield model
        finally:
            model.load_state_dict(backup, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.decay = float(state["decay"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
