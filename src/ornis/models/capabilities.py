"""What an encoder can do beyond the common API, declared as mixins a recipe asks for (Birder's
``MaskedTokenOmissionMixin`` / ``MaskedTokenRetentionMixin``): a recipe checks ``isinstance(net, capability)`` (or
calls ``require``) and then uses the one entry point the capability defines, never the family's internals.

Token omission (MAE-style masked image modelling): the encoder runs on the visible cells only. Token retention
(iBOT / DINOv2): every position is encoded, the masked ones with their stem tokens replaced by a mask token.
Sine-cosine positions: the learned position table can start as a 2-D sine-cosine one.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from ornis.errors import OrnisError
from ornis.models.registry import families_with


class UnsupportedEncoderError(OrnisError):
    """A recipe cannot train this architecture: it lacks a capability the recipe needs."""


class OmissionLayout(NamedTuple):
    """How token omission cuts an input of a given size.

    grid
        (rows, columns) of cells: the smallest pieces of the image the encoder can leave out (a ViT's patches, a
        Hiera's mask units).
    cell
        A cell's side in pixels.
    cell_tokens
        A cell's side in stem tokens: 1 where any token can be left out; more where the architecture leaves out
        whole units of its own (Hiera's 8 x 8-token mask units), which a recipe then cannot regroup.
    scale_channels, scale_sides
        Per output of ``masked_omission`` (finest first, the final one last): its width, and the side m of the
        m x m positions each visible cell has at that scale.
    special_tokens
        Tokens that belong to no cell and see every visible one (a ViT's class and register tokens): the final
        output of ``masked_omission`` starts with them.
    """

    grid: tuple[int, int]
    cell: int
    cell_tokens: int
    scale_channels: tuple[int, ...]
    scale_sides: tuple[int, ...]
    special_tokens: int = 0


class MaskedTokenOmission:
    """Capability: encode only the visible cells of an image (the source of MAE's speed)."""

    default_mask_ratio: ClassVar[float]  # the share of cells the family's MIM paper hides
    mim_positions: ClassVar[str]  # how that paper starts the position table from scratch: "sincos" or "random"

    def omission_layout(self, size: tuple[int, int]) -> OmissionLayout:
        """The cell grid and the outputs' shapes for an input of ``size`` (H, W)."""
        raise NotImplementedError

    def masked_omission(
        self, x: torch.Tensor, hidden: torch.Tensor, num_hidden: int | None = None
    ) -> list[torch.Tensor]:
        """Encode the cells of ``x`` that ``hidden`` (B, rows * columns) bool, row-major on the layout's grid, leaves
        visible (every row hides as many: ``num_hidden`` if the caller knows it, see ``visible_cells``). Returns, per
        scale of the layout, the visible cells in increasing cell order as (B, K, m, m, C); the last scale is the
        encoder's final output (m = 1), led by the layout's ``special_tokens`` (B, S + K, 1, 1, C)."""
        raise NotImplementedError

    def omission_unused_modules(self) -> list[nn.Module]:
        """Modules ``masked_omission`` does not run (a trainer freezes them, so DDP does not wait for their
        gradients)."""
        return []


def visible_cells(hidden: torch.Tensor, num_hidden: int | None = None) -> torch.Tensor:
    """(B, K) indices of the cells ``hidden`` (B, cells; nonzero = hidden) leaves visible, ascending per row.

    Every row must hide as many cells. Given ``num_hidden`` (that count, known on the host, as a mask generator
    knows it), nothing waits for the device and the shapes stay static under ``torch.compile`` (a stable argsort
    puts the visible cells first, in order). Without it the counts are read from the mask (one host sync, and a
    graph break under ``torch.compile``) and must agree (``ValueError`` otherwise).
    """
    cells = hidden.shape[1]
    if num_hidden is None:
        counts = hidden.bool().sum(dim=1).tolist()
        if len(set(counts)) > 1:
            raise ValueError(f"every row of the mask must hide as many cells; the rows hide {counts}")
        num_hidden = counts[0] if counts else 0
    order = torch.argsort(hidden.bool().to(torch.uint8), dim=1, stable=True)
    return order[:, : cells - num_hidden]


class RetainedTokens(NamedTuple):
    """What ``masked_retention`` returns: the pooled embedding (B, D) and the final patch tokens (B, rows * columns,
    D) on the retention grid."""

    embedding: torch.Tensor
    patch_tokens: torch.Tensor


class MaskedTokenRetention:
    """Capability: encode every position with masked cells' stem tokens replaced by a mask token (iBOT, DINOv2).
    The mask token is ``stem_width`` wide."""

    def retention_grid(self, size: tuple[int, int], patch_size: int | None = None) -> tuple[int, int]:
        """The (rows, columns) grid masks are laid on for an input of ``size`` (H, W)."""
        raise NotImplementedError

    def masked_retention(
        self,
        x: torch.Tensor,
        mask: torch.Tensor | None = None,
        mask_token: torch.Tensor | None = None,
        patch_size: int | None = None,
    ) -> RetainedTokens:
        """Encode ``x`` with the cells where ``mask`` (B, rows * columns) is True blanked to ``mask_token``
        (``stem_width``,) before the position embedding (to zero without a token). ``patch_size``: a FlexiViT's
        patch size for this call (encoders with a fixed stem refuse it)."""
        raise NotImplementedError


class SinCosPositions:
    """Capability: start the learned position embeddings as a 2-D sine-cosine table (``layers.sincos_table``, MAE's
    fixed table) instead of small random values, for training from scratch. At std 0.02 the positions are lost
    against the patch embeddings, and a random ViT pools an image into little more than a bag of its patches."""

    def init_sincos_positions(self) -> None:
        """Overwrite the position table(s) in place: the grid's with the sine-cosine table, any other (special
        tokens', a window's) with zeros."""
        raise NotImplementedError


def require(net: nn.Module, capability: type, what: str) -> None:
    """Raise ``UnsupportedEncoderError`` naming the architecture and the families that can, unless ``net`` has
    ``capability``."""
    if isinstance(net, capability):
        return
    name = getattr(net, "name", type(net).__name__)
    family = getattr(net, "family", None)
    able = ", ".join(families_with(capability))
    raise UnsupportedEncoderError(
        f"{what} needs an encoder with {capability.__name__}, which {name!r} (family {family!r}) does not have; "
        f"families that have it: {able}"
    )
