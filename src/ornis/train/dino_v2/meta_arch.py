"""DINOv2's student and EMA teacher: the same network (backbone + DINO head, optionally a separate iBOT head, and
the mask token), the teacher a frozen copy that follows the student by an exponential moving average."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ornis.models.base import Encoder
from ornis.train.dino_v2.heads import DINOHead


@dataclass(frozen=True)
class HeadConfig:
    """The DINO / iBOT heads' shape."""

    out_dim: int = 65536  # prototypes
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    separate_ibot_head: bool = False  # DINOv2 default: one head scores class and patch tokens
    batch_norm: bool = False  # batch normalisation in the head's MLP (DINO's use_bn), per kind of rows


class ViewOutputs(NamedTuple):
    """What one network says about a step's views (a named tuple: DDP and torch.compile look inside it)."""

    global_embedding: torch.Tensor  # (G*B, D): backbone embedding of the global views (KoLeo's input)
    global_logits: torch.Tensor  # (G*B, K)
    local_logits: torch.Tensor | None  # (N*B, K), None when the local views were not given (the teacher)
    masked_patch_logits: torch.Tensor  # (M, K): the M masked patches, in mask.nonzero() order


class SelfDistillationNet(nn.Module):
    """Backbone + heads + mask token. The student runs it on masked global views and the local views; the teacher
    (a copy) on the unmasked global views only, scoring the patches the student had masked.

    The backbone has ``MaskedTokenRetention``: one forward gives the embedding (B, D) and the final patch tokens on
    its mask grid, with the masked cells' stem tokens replaced by the mask token (``stem_width`` wide)."""

    def __init__(self, backbone: Encoder, heads: HeadConfig) -> None:
        super().__init__()
        self.backbone = backbone
        dim = backbone.embedding_size

        def head() -> DINOHead:
            return DINOHead(
                dim, heads.out_dim, heads.hidden_dim, heads.bottleneck_dim, heads.num_layers, heads.batch_norm
            )

        self.dino_head = head()
        self.ibot_head = head() if heads.separate_ibot_head else None
        # The token that replaces masked patches; it lives here, not in the backbone, so the backbone's state dict
        # stays the published architecture's
        self.mask_token = nn.Parameter(torch.zeros(backbone.stem_width))

    @property
    def num_layer_groups(self) -> int:
        """The backbone's layer groups (layer-wise lr decay)."""
        return self.backbone.num_layer_groups

    def layer_id(self, param_name: str) -> int:
        """The backbone's groups for its parameters; the mask token is part of the stem (group 0, as in DINOv2),
        the heads come after the last block."""
        if param_name.startswith("backbone."):
            return self.backbone.layer_id(param_name[len("backbone.") :])
        return 0 if param_name == "mask_token" else self.num_layer_groups - 1

    def patch_embedding_parameters(self) -> set[str]:
        """Names of the stem's convolution weights (the patch embedding), which DINOv2 trains at lr x 0.2."""
        stem = set(self.backbone.stem_names)
        return {
            f"backbone.{prefix}.{n}"
            for prefix, m in self.backbone.named_modules()
            if isinstance(m, nn.Conv2d) and prefix.split(".", 1)[0] in stem
            for n, _ in m.named_parameters()
        }

    def forward(
        self,
        global_crops: torch.Tensor,
        local_crops: torch.Tensor | None,
        masks: torch.Tensor,
        patch_size: int | None = None,
        mask_input: bool = True,
    ) -> ViewOutputs:
        """``masks`` (G*B, h*w) bool picks the patches iBOT scores; ``mask_input`` also hides them from the backbone
        (the student) instead of only selecting them afterwards (the teacher)."""
        hidden = masks if mask_input else None
        global_embedding, patch_tokens = self.backbone.masked_retention(
            global_crops, hidden, self.mask_token, patch_size
        )
        masked_patches = patch_tokens[masks]
        local_embedding = None
        if local_crops is not None and local_crops.numel():
            local_embedding = self.backbone.masked_retention(local_crops, patch_size=patch_size).embedding

        # One head call for every class token (and the patches, when the head is shared): fewer, larger matmuls;
        # a head with batch normalisation is called once per kind of rows, so each kind has its own statistics
        rows = [global_embedding] + ([local_embedding] if local_embedding is not None else [])
        if self.ibot_head is None:
            rows.append(masked_patches)
        if self.dino_head.batch_norm:
            parts = [self.dino_head(r) for r in rows]
        else:
            parts = list(torch.split(self.dino_head(torch.cat(rows)), [r.shape[0] for r in rows]))
        global_logits = parts.pop(0)
        local_logits = parts.pop(0) if local_embedding is not None else None
        if self.ibot_head is None:
            patch_logits = parts.pop(0)
        else:
            patch_logits = self.ibot_head(masked_patches)
        return ViewOutputs(global_embedding, global_logits, local_logits, patch_logits)


def make_teacher(student: SelfDistillationNet) -> SelfDistillationNet:
    """A frozen copy of the student, in eval mode (no drop-path), to be updated only by ``ema_update``."""
    teacher = copy.deepcopy(student)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter; buffers are copied."""
    t_params = list(teacher.parameters())
    s_params = [p.detach() for p in student.parameters()]
    if len(t_params) != len(s_params):
        raise ValueError(f"teacher has {len(t_params)} parameters, student {len(s_params)}")
    # One foreach call instead of a Python loop over ~150 tensors; the same lerp kernel, so the same numbers
    torch._foreach_lerp_(t_params, s_params, 1.0 - momentum)
    t_buffers, s_buffers = list(teacher.buffers()), list(student.buffers())
    if t_buffers:
        torch._foreach_copy_(t_buffers, s_buffers)


def teacher_momentum(step: int, total_steps: int, base: float = 0.992, final: float = 1.0) -> float:
    """DINO's EMA momentum: half a cosine from ``base`` at step 0 to ``final`` at the last step."""
    if total_steps <= 1:
        return base
    progress = min(1.0, step / (total_steps - 1))
    return final - (final - base) * (math.cos(math.pi * progress) + 1) / 2
