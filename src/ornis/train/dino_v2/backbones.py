"""What DINOv2 needs from a backbone, per family: the embedding and the final patch tokens of one forward pass,
with chosen patches replaced by a mask token, and the grid those masks are laid on.

ViT / FlexiViT: the mask grid is the patch grid; the embedding is the class token after the final norm and the
patch tokens are the final normed patch tokens (DINOv2's ``x_norm_clstoken`` / ``x_norm_patchtokens``).
HieraDet: masks are laid on the last stage's grid (stride 32) and spread to the patch-embedding grid, the embedding
is the pooled last stage and the patch tokens are the last stage's tokens (the reference's DINOv2 recipe for
hierarchical backbones).
"""

from __future__ import annotations

import torch
from torch import nn

from ornis.errors import OrnisError


class UnsupportedBackboneError(OrnisError):
    """The recipe cannot train this architecture (no masked forward for it)."""


def family_of(backbone: nn.Module) -> str:
    family = getattr(backbone, "family", None)
    if family == "vit" or family == "hieradet":
        return family
    raise UnsupportedBackboneError(
        f"DINOv2 training supports the vit / flexivit and hieradet families; {getattr(backbone, 'name', type(backbone).__name__)!r} "
        f"is of family {family!r}"
    )


def mask_token_dim(backbone: nn.Module) -> int:
    """Width of the tokens the mask token replaces (the patch embedding's)."""
    if family_of(backbone) == "vit":
        return backbone.embedding_size
    return _hieradet_stem_width(backbone)


def mask_grid(backbone: nn.Module, image_size: tuple[int, int], patch_size: int | None = None) -> tuple[int, int]:
    """The (h, w) grid iBOT masks are drawn on for an input of ``image_size``."""
    if family_of(backbone) == "vit":
        p = patch_size or backbone.patch_size
        return (image_size[0] // p, image_size[1] // p)
    stride = _hieradet_max_stride(backbone)
    return (image_size[0] // stride, image_size[1] // stride)


def encode(
    backbone: nn.Module,
    images: torch.Tensor,
    mask: torch.Tensor | None = None,
    mask_token: torch.Tensor | None = None,
    patch_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(embedding (B, D), patch tokens (B, h*w, D)) for ``images``; ``mask`` (B, h*w) bool on ``mask_grid``."""
    if family_of(backbone) == "vit":
        tokens, _ = backbone.embed_tokens(images, patch_size, mask=mask, mask_token=mask_token)
        tokens, _ = backbone.encoder(tokens)
        tokens = backbone.norm(tokens)
        return backbone.pool(tokens), tokens[:, backbone.num_special_tokens :]
    return _hieradet_encode(backbone, images, mask, mask_token)


# -- HieraDet ------------------------------------------------------------------------------------------------------
def _hieradet_max_stride(backbone: nn.Module) -> int:
    stride = getattr(backbone, "max_stride", None)
    if stride is None:
        raise UnsupportedBackboneError(f"{backbone.name}: HieraDet backbone without max_stride")
    return int(stride)


def _hieradet_stem_width(backbone: nn.Module) -> int:
    width = getattr(backbone, "stem_width", None)
    if width is None:
        raise UnsupportedBackboneError(f"{backbone.name}: HieraDet backbone without stem_width")
    return int(width)


def _hieradet_encode(
    backbone: nn.Module, images: torch.Tensor, mask: torch.Tensor | None, mask_token: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    masked_forward = getattr(backbone, "masked_features", None)
    if masked_forward is None:
        raise UnsupportedBackboneError(f"{backbone.name}: this HieraDet has no masked forward (masked_features)")
    token_mask = None
    if mask is not None:
        # Spread each last-stage cell's mask over the stem tokens under it
        grid = mask_grid(backbone, (images.shape[-2], images.shape[-1]))
        stride = _hieradet_max_stride(backbone) // getattr(backbone, "stem_stride", 4)
        token_mask = mask.reshape(-1, *grid).repeat_interleave(stride, 1).repeat_interleave(stride, 2)
    features = masked_forward(images, token_mask, mask_token)  # (B, C, h, w): the last stage, as a map
    tokens = features.flatten(2).transpose(1, 2)
    return backbone.pool_features(features), tokens

