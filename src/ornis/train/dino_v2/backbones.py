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
    from ornis.models.hieradet import TOTAL_STRIDE

    return TOTAL_STRIDE


def _hieradet_stem_width(backbone: nn.Module) -> int:
    return int(backbone.config.embed_dim)


def _hieradet_encode(
    backbone: nn.Module, images: torch.Tensor, mask: torch.Tensor | None, mask_token: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if mask is None:
        features = backbone.forward_features(images)  # (B, h, w, C), channels-last, before the final norm
        return backbone.features(features), features.flatten(1, 2)
    # Masked cells of the last stage's grid blank the 8x8 stem tokens under them, before the position embedding;
    # the patch tokens are the last stage's before the final norm, as in the reference's recipe for HieraDet
    out = backbone.masked_encoding_retention(images, mask, mask_token, return_keys="all")
    return out["embedding"], out["features"].flatten(2).transpose(1, 2)
