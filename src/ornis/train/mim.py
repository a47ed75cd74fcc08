"""Masked image modelling, MAE-style (He et al. 2021): hide most of the image, encode only what is visible, and
let a light decoder predict the hidden pixels, each patch's pixels normalised by their own mean and variance.

The encoder declares how it can leave cells of the image out (``MaskedTokenOmission``): a plain ViT any patch, a Hiera
only its own 8 x 8-token (32 x 32-pixel) mask units, as its mask-unit attention needs whole units. What is hidden is a
*mask unit* of ``mask_unit`` x ``mask_unit`` cells (default 1; fixed at 1 where the cells are already the architecture's
own units). The encoder sees only the visible cells (token omission, the source of MAE's speed); the decoder sees them
plus a learned mask token at every hidden position, with its own position embedding, and predicts the pixels of every
position (a cell, or for Hiera a quarter of one); the loss is the mean squared error over the hidden ones only. Masks
are drawn per sample in the data pipeline (``MaskedSample``), so they repeat on resume and whatever the number of ranks.

The published-format checkpoint holds the encoder alone (no head): ``ornis.load_pretrained_model(path)`` gives
the pretrained backbone, ready for ``embed`` or fine-tuning with ``ornis train classify --weights``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ornis.models.base import Encoder
from ornis.models.capabilities import MaskedTokenOmission, require, visible_cells
from ornis.models.layers import sincos_table, without_stochastic_depth
from ornis.models.registry import get_model_spec
from ornis.models.vit import EncoderBlock, ViTConfig
from ornis.train.config import OptimDefaults, Recipe, TrainConfig, TrainResult
from ornis.train.data import SampleDataset, open_source, train_transform
from ornis.train.loop import run
from ornis.train.start import Positions, start_encoder
from ornis.weights.checkpoint import Checkpoint, checkpoint_from_model

log = logging.getLogger("ornis.train")


def random_unit_mask(batch: int, num_units: int, mask_ratio: float, device: torch.device) -> torch.Tensor:
    """(B, num_units) bool, True where hidden; exactly ``round(num_units * mask_ratio)`` hidden per image, so the
    visible tokens of a batch stack into one tensor."""
    num_hidden = hidden_units(num_units, mask_ratio)
    if not 0 < num_hidden < num_units:
        raise ValueError(
            f"mask ratio {mask_ratio} hides {num_hidden} of {num_units} mask units; hide at least one, keep one"
        )
    order = torch.rand(batch, num_units, device=device).argsort(dim=1)
    mask = torch.zeros(batch, num_units, dtype=torch.bool, device=device)
    mask.scatter_(1, order[:, :num_hidden], True)
    return mask


def hidden_units(num_units: int, mask_ratio: float) -> int:
    """How many of ``num_units`` mask units a mask of ``mask_ratio`` hides (the same in every row)."""
    return int(round(num_units * mask_ratio))


def units_to_tokens(mask: torch.Tensor, units_grid: tuple[int, int], unit: int) -> torch.Tensor:
    """A (B, uh*uw) mask-unit mask -> the (B, h*w) token mask, row-major over the token grid (h = uh * unit)."""
    B = mask.shape[0]
    m = mask.view(B, units_grid[0], 1, units_grid[1], 1).expand(-1, -1, unit, -1, unit)
    return m.reshape(B, units_grid[0] * unit * units_grid[1] * unit)


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, h*w, patch*patch*C), patches row-major, each patch's pixels in (py, px, c) order."""
    B, C, H, W = images.shape
    x = images.reshape(B, C, H // patch, patch, W // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(B, (H // patch) * (W // patch), patch * patch * C)


def normalized_pixel_loss(
    pred: torch.Tensor, images: torch.Tensor, token_mask: torch.Tensor, patch: int, norm_pix: bool = True
) -> torch.Tensor:
    """MAE's loss: MSE between predicted and true pixels of the hidden patches, each true patch normalised by its
    own mean and variance (``norm_pix``; eps 1e-6 as in MAE)."""
    target = patchify(images.float(), patch)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1e-6).sqrt()
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)
    m = token_mask.float()
    return (per_patch * m).sum() / m.sum()


class MaskedAutoencoder(nn.Module):
    """Encoder (an ornis encoder with ``MaskedTokenOmission``, trained) + light decoder (thrown away after
    pretraining). ``forward(images)`` returns the loss, so DDP wraps the whole thing.

    The decoder has one position per final-scale position of the encoder's output: one per cell for a ViT (its
    patch), 2 x 2 per mask unit for Hiera-MAE (whose last stage runs at stride 16, so each position predicts 16 x 16
    pixels, as upstream). An encoder with one output gives its final tokens; one with several scales (Hiera's
    stages) has each scale pooled to the final one's positions by a strided conv and summed with it, then normed
    (Hiera-MAE's multi-scale fusion). The encoder's special tokens (a ViT's class and register tokens) join the
    decoder too, without a position (MAE's zero row): the decoder can read them, so the class token learns to sum up
    the visible image, where without them nothing trains its final output.
    """

    def __init__(
        self,
        encoder: Encoder,
        decoder_dim: int = 256,
        decoder_depth: int = 4,
        decoder_heads: int = 8,
        mask_ratio: float | None = None,
        mask_unit: int | None = None,
        norm_pix: bool = True,
        sincos_decoder_positions: bool = False,
    ) -> None:
        super().__init__()
        require(encoder, MaskedTokenOmission, "masked image modelling")
        self.encoder = encoder
        self.mask_ratio = mask_ratio if mask_ratio is not None else encoder.default_mask_ratio
        self.norm_pix = norm_pix
        width = encoder.embedding_size
        layout = encoder.omission_layout(encoder.size)
        if layout.cell_tokens > 1 and mask_unit not in (None, 1):
            t = layout.cell_tokens
            raise ValueError(
                f"{encoder.name} masks its own {t}x{t}-token mask units; mask_unit must be left unset, got {mask_unit}"
            )
        # The decoder has one position per final-scale position: side x side of them a cell (1 for a ViT, 2 x 2
        # for Hiera-MAE), each predicting its pixel_patch x pixel_patch pixels
        self.side = layout.scale_sides[-1]
        self.cells = layout.grid
        self.grid = (layout.grid[0] * self.side, layout.grid[1] * self.side)
        self.pixel_patch = layout.cell // self.side
        self.special_tokens = layout.special_tokens
        if len(layout.scale_channels) > 1 and layout.special_tokens:
            raise ValueError(f"{encoder.name}: multi-scale fusion of an encoder with special tokens is not supported")
        self.mask_unit = mask_unit or 1
        self.fusion_heads: nn.ModuleList | None = None
        if len(layout.scale_channels) > 1:
            # scale i's visible cells come as m x m patches: a stride m / side conv brings each to side x side
            self.fusion_heads = nn.ModuleList(
                nn.Conv2d(c, width, kernel_size=m // self.side, stride=m // self.side)
                if m > self.side
                else nn.Identity()
                for c, m in zip(layout.scale_channels, layout.scale_sides)
            )
            self.encoder_norm = nn.LayerNorm(width, eps=1e-6)
        # Frozen, so DDP does not wait for their gradients (MAE-Hiera leaves the pooled norm at its initial values)
        for module in encoder.omission_unused_modules():
            module.requires_grad_(False)
        if self.cells[0] % self.mask_unit or self.cells[1] % self.mask_unit:
            raise ValueError(
                f"the {self.cells} token grid does not split into {self.mask_unit}x{self.mask_unit} mask units"
            )
        self.decoder_embed = nn.Linear(width, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], decoder_dim))
        dec_cfg = ViTConfig(
            patch_size=1,
            num_layers=decoder_depth,
            num_heads=decoder_heads,
            hidden_dim=decoder_dim,
            mlp_dim=4 * decoder_dim,
        )
        self.decoder_blocks = nn.ModuleList(EncoderBlock(dec_cfg, 0.0) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(decoder_dim, self.pixel_patch * self.pixel_patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)
        nn.init.normal_(self.decoder_pos_embed, std=0.02)
        if sincos_decoder_positions:  # MAE's decoder table (learned here, fixed in MAE)
            with torch.no_grad():
                self.decoder_pos_embed[0] = sincos_table(self.grid, decoder_dim)
        for m in [self.decoder_embed, self.decoder_pred, *self.decoder_blocks.modules()]:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def no_weight_decay(self) -> set[str]:
        """The decoder's mask token and position table."""
        return {"mask_token", "decoder_pos_embed"}

    def encode_visible(
        self, images: torch.Tensor, cell_mask: torch.Tensor, num_hidden: int | None = None
    ) -> torch.Tensor:
        """(B, special + n_visible * side**2, width): the encoder's special tokens, then its output for the visible
        cells (``cell_mask`` (B, cells), True = hidden) in ascending order, each cell's side x side positions
        row-major. ``num_hidden``: the hidden cells per row, when known on the host (no device sync)."""
        scales = self.encoder.masked_omission(images, cell_mask, num_hidden)  # visible cells in ascending order
        if self.fusion_heads is None:
            final = scales[-1]
            return final.reshape(final.shape[0], -1, final.shape[-1])
        fused = 0.0
        for head, x in zip(self.fusion_heads, scales):  # x: (B, K, m, m, C)
            B, K, m, _, C = x.shape
            if not isinstance(head, nn.Identity):
                x = head(x.reshape(B * K, m, m, C).permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
            fused = fused + x.reshape(B, K * self.side * self.side, -1)
        return self.encoder_norm(fused)

    def decoder_positions(self, cell_mask: torch.Tensor, num_hidden: int | None = None) -> torch.Tensor:
        """(B, n_visible * side**2): where ``encode_visible``'s outputs sit in the decoder's row-major grid."""
        cells = visible_cells(cell_mask, num_hidden)  # (B, K) ascending
        s, width = self.side, self.cells[1]
        if s == 1:
            return cells
        row, col = (cells // width)[..., None, None] * s, (cells % width)[..., None, None] * s
        offset = torch.arange(s, device=cells.device)
        return ((row + offset[:, None]) * width * s + col + offset).reshape(cells.shape[0], -1)

    @property
    def units_grid(self) -> tuple[int, int]:
        """The grid masks are drawn on: (rows, columns) of mask units."""
        return (self.cells[0] // self.mask_unit, self.cells[1] // self.mask_unit)

    def forward(self, images: torch.Tensor, unit_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, token_mask). Images must have the encoder's size; ``unit_mask`` (B, units), True = hidden, is
        drawn here when not given (the recipe draws it per sample in the data pipeline instead, see
        ``MaskedSample``); either way it hides ``hidden_units(units, mask_ratio)`` units in every row, which keeps
        the step free of host syncs (the visible tokens' positions come from a stable argsort, not a boolean
        index)."""
        B = images.shape[0]
        if tuple(images.shape[-2:]) != tuple(self.encoder.size):
            raise ValueError(f"MIM images must be {self.encoder.size}, got {tuple(images.shape[-2:])}")
        units = self.units_grid
        if unit_mask is None:
            unit_mask = random_unit_mask(B, units[0] * units[1], self.mask_ratio, images.device)
        cell_mask = units_to_tokens(unit_mask, units, self.mask_unit)
        token_mask = units_to_tokens(unit_mask, units, self.mask_unit * self.side)  # the decoder's grid
        num_hidden = hidden_units(units[0] * units[1], self.mask_ratio) * self.mask_unit**2
        encoded = self.decoder_embed(self.encode_visible(images, cell_mask, num_hidden))
        special, visible = encoded[:, : self.special_tokens], encoded[:, self.special_tokens :]
        full = self.mask_token.to(visible.dtype).expand(B, token_mask.shape[1], -1)
        where = self.decoder_positions(cell_mask, num_hidden).unsqueeze(-1).expand(-1, -1, visible.shape[-1])
        full = full.scatter(1, where, visible)
        x = torch.cat([special, full + self.decoder_pos_embed], dim=1)
        for blk in self.decoder_blocks:
            x = blk(x)
        pred = self.decoder_pred(self.decoder_norm(x[:, self.special_tokens :]))
        return normalized_pixel_loss(pred, images, token_mask, self.pixel_patch, self.norm_pix), token_mask


class MaskedSample:
    """Image transform + a random mask-unit mask drawn with it: the mask then comes from the sample's own seed, so
    it is the same whatever the number of ranks (one process with batch B masks exactly as two with B / 2)."""

    def __init__(self, transform: Any, num_units: int, mask_ratio: float) -> None:
        self.transform, self.num_units, self.mask_ratio = transform, num_units, mask_ratio

    def __call__(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(transformed image, (num_units,) bool mask, True = hidden)."""
        return self.transform(image), random_unit_mask(1, self.num_units, self.mask_ratio, torch.device("cpu"))[0]


# MAE / Hiera-MAE's optimisation: lr 1.5e-4 x B / 256, warm-up 5 % (40 of 800 epochs), weight decay 0.05, AdamW
# betas (0.9, 0.95), no gradient clipping
MIM_OPTIM = OptimDefaults(
    base_lr=1.5e-4,
    lr_scaling="linear",
    reference_batch=256,
    warmup_fraction=0.05,
    weight_decay=0.05,
    betas=(0.9, 0.95),
    grad_clip=0.0,
)


class MIMRecipe(Recipe):
    """Batches are ``((images, unit_masks), labels)`` (``MaskedSample`` in a ``SampleDataset``); labels unused."""

    name = "mim"
    optim_defaults = MIM_OPTIM
    best_metric = "knn_top1"  # with --eval-knn: <tag>_best.pt, and a warning when it falls far below its best

    def __init__(self, mae: MaskedAutoencoder, rgb_stats: dict[str, Any]) -> None:
        self.model = mae
        self.rgb_stats = rgb_stats

    @property
    def encoder(self) -> nn.Module:
        """The encoder being pretrained (the decoder is not exported)."""
        return self.model.encoder

    def loss(self, model: nn.Module, batch: Any, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The masked autoencoder's pixel loss."""
        images, unit_mask = batch[0]
        loss, _ = model(images, unit_mask)
        return loss, {}

    def export_checkpoint(self) -> Checkpoint:
        """The encoder alone, without classes."""
        return checkpoint_from_model(self.model.encoder, class_to_idx={}, rgb_stats=self.rgb_stats)


@dataclass
class MIMOptions:
    """What ``train_mim`` builds; the loop's settings are a separate ``TrainConfig``."""

    train: str | os.PathLike | list[str]  # any folder of images (no labels needed), a .tar shard, a folder of shards
    weights: str | os.PathLike | None = None  # continue pretraining a checkpoint
    arch: str | None = None  # or start from scratch
    size: int | None = None
    model_config: dict[str, Any] | None = None  # from scratch; stochastic depth is off (MAE and Hiera-MAE pretrain
    # without it) unless this names "drop_path_rate"; the checkpoint keeps the architecture's rates for fine-tuning
    positions: Positions | None = None  # from scratch: "sincos" starts the encoder's and the decoder's tables as
    # 2-D sine-cosine ones (MAE's, learned here; see start_encoder); None: the family's MIM paper's (mim_positions:
    # sine-cosine for a ViT as MAE, the architecture's own for Hiera as Hiera-MAE)
    mask_ratio: float | None = None  # default: the encoder's (0.75 for ViT, 0.6 for Hiera)
    mask_unit: int | None = None  # mask-unit side in cells (default 1; ViT: patches); Hiera: its own, leave unset
    decoder_dim: int = 512  # MAE, Hiera-MAE and Birder: 512 wide, 8 blocks, 16 heads
    decoder_depth: int = 8
    decoder_heads: int = 16
    norm_pix: bool = True
    crop_scale: tuple[float, float] = (0.2, 1.0)


def build_mae(opts: MIMOptions) -> tuple[MaskedAutoencoder, dict[str, Any]]:
    """The masked autoencoder over the encoder ``opts`` starts from, and the encoder's rgb stats."""
    positions = opts.positions or mim_positions(opts.arch)
    started = start_encoder(opts.weights, opts.arch, opts.size, opts.model_config, positions=positions)
    if "drop_path_rate" not in (opts.model_config or {}):
        without_stochastic_depth(started.encoder)
    mae = MaskedAutoencoder(
        started.encoder,
        opts.decoder_dim,
        opts.decoder_depth,
        opts.decoder_heads,
        opts.mask_ratio,
        opts.mask_unit,
        opts.norm_pix,
        sincos_decoder_positions=opts.weights is None and positions == "sincos",
    )
    return mae, started.rgb_stats


def mim_positions(arch: str | None) -> Positions:
    """How ``arch``'s family starts its position table for MIM from scratch (``MaskedTokenOmission.mim_positions``);
    ``"random"`` when continuing from a checkpoint (no arch), where nothing is started."""
    if arch is None:
        return "random"
    cls = get_model_spec(arch).cls
    return getattr(cls, "mim_positions", "random")


def train_mim(opts: MIMOptions, cfg: TrainConfig) -> TrainResult:
    """MAE pretraining (or continued pretraining) on any images; labels, if the data has them, are ignored."""
    source = open_source(opts.train, labelled=False)
    torch.manual_seed(cfg.seed)  # the decoder (and a from-scratch encoder) start the same on every rank and run
    mae, rgb_stats = build_mae(opts)
    transform = train_transform(mae.encoder.size, rgb_stats, scale=opts.crop_scale, auto_augment=None)
    units = mae.units_grid
    transform = MaskedSample(transform, units[0] * units[1], mae.mask_ratio)
    return run(MIMRecipe(mae, rgb_stats), SampleDataset(source, transform), cfg)
