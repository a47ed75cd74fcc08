"""AdamW parameter groups (weight-decay exclusions, layer-wise lr decay), the warm-up + cosine schedule, and EMA.

What a parameter is (a position embedding, a stem or block parameter) is declared by the modules themselves
(``no_weight_decay``, ``layer_id``, as ornis encoders do); nothing here reads parameter names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def declared_no_weight_decay(model: nn.Module) -> set[str]:
    """Full names of the parameters that ``model`` and its sub-modules declare through ``no_weight_decay()``
    (position embeddings, learned tokens: timm's protocol, which ornis encoders and recipe modules follow)."""
    names: set[str] = set()
    for prefix, module in model.named_modules():
        declared = getattr(module, "no_weight_decay", None)
        if callable(declared):
            names |= {f"{prefix}.{n}" if prefix else n for n in declared()}
    return names


def layer_ids(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer group of every parameter for layer-wise lr decay, and the last group's index.

    Inside the first module that declares groups (``layer_id`` / ``num_layer_groups``: an ornis encoder, found in
    ``named_modules`` order, so the outermost): 0 is the stem, i + 1 block i, the last group what follows the blocks.
    Parameters outside it (a decoder, DINO's heads) join group 0 when they come before it in ``named_parameters``
    order, else the last group. A model without such a module has every parameter in group 0, the last group being 1.
    """
    grouped = ((p, m) for p, m in model.named_modules() if callable(getattr(m, "layer_id", None)))
    found = next(grouped, None)
    if found is None:
        return {n: 0 for n, _ in model.named_parameters()}, 1
    prefix, encoder = found
    last = encoder.num_layer_groups - 1
    lead = f"{prefix}." if prefix else ""
    out: dict[str, int] = {}
    seen = False
    for name, _ in model.named_parameters():
        if name.startswith(lead):
            out[name] = encoder.layer_id(name[len(lead) :])
            seen = True
        else:
            out[name] = last if seen else 0
    return out, last


def param_groups(
    model: nn.Module,
    weight_decay: float,
    layer_decay: float | None = None,
    *,
    declared_no_decay: bool = True,
    tags: Callable[[str], GroupTag | None] | None = None,
) -> list[dict[str, Any]]:
    """AdamW groups over the trainable parameters: one per (decay or not, layer, tag), each with ``lr_scale``
    (``layer_decay ** (last group - layer_id)``, 1 without layer decay, times the tag's ``lr_scale``) that the loop
    multiplies the lr by, ``wd_scale`` (0 or 1) that it multiplies the scheduled weight decay by, and
    ``frozen_until`` (the tag's: the group's lr is 0 before that step).

    No weight decay for biases, norm weights and layer-scale gammas (all 1-D) and, with ``declared_no_decay``, for
    what the modules declare (``declared_no_weight_decay``; DINOv2 decays them, MAE does not). ``tags(name)`` puts
    a parameter in a group of its own (DINOv2's patch-embedding lr x 0.2, its frozen prototype layer)."""
    ids, num_layers = layer_ids(model) if layer_decay is not None else ({}, 0)
    no_decay = declared_no_weight_decay(model) if declared_no_decay else set()
    groups: dict[tuple[bool, int, str], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name in no_decay
        layer = ids.get(name, 0)
        tag = tags(name) if tags is not None else None
        key = (skip, layer, tag.name if tag is not None else "")
        if key not in groups:
            scale = layer_decay ** (num_layers - layer) if layer_decay is not None else 1.0
            groups[key] = {
                "params": [],
                "weight_decay": 0.0 if skip else weight_decay,
                "wd_scale": 0.0 if skip else 1.0,
                "lr_scale": scale * (tag.lr_scale if tag is not None else 1.0),
                "frozen_until": tag.frozen_until if tag is not None else 0,
                "names": [],
            }
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    # "names" stays in the group: the optimizer's state_dict keeps it as plain data, useful when reading one
    return [groups[k] for k in sorted(groups)]


@dataclass(frozen=True)
class GroupTag:
    """Parameters that need a group of their own: an lr multiplier, and a number of steps with lr 0."""

    name: str
    lr_scale: float = 1.0
    frozen_until: int = 0  # the group's lr is 0 for the steps before this one (its optimizer state still moves)


def cosine_schedule(step: int, total_steps: int, start: float, end: float) -> float:
    """Half a cosine from ``start`` at step 0 to ``end`` at the last step (DINOv2's weight-decay schedule)."""
    progress = min(1.0, step / max(1, total_steps - 1))
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))


def clip_gradients(model: nn.Module, max_norm: float, per_module: bool) -> torch.Tensor:
    """Clip the gradients' norm to ``max_norm``: over all of ``model``, or (``per_module``) over each top-level
    module and the model's own parameters apart, as DINOv2 clips its backbone and heads. Returns the norm of all
    gradients before clipping (a tensor: reading it is left to the caller)."""
    if not per_module:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    parts = [list(child.parameters()) for child in model.children()]
    parts.append(list(model.parameters(recurse=False)))
    norms = [torch.nn.utils.clip_grad_norm_(ps, max_norm) for ps in parts if any(p.grad is not None for p in ps)]
    if not norms:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([n.float() for n in norms]))


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
        """One step of the average towards ``model``'s current values."""
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
        """The decay and the averaged tensors (on the CPU)."""
        return {"decay": self.decay, "shadow": {k: v.cpu() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.decay = float(state["decay"])
        for k, v in state["shadow"].items():
            self.shadow[k].copy_(v)
