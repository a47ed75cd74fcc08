"""DINOv2's views of an image: two global crops and N local crops (multi-crop, Caron et al., 2020), and the
iBOT block masks laid over the global crops' patch grids."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torchvision.transforms import v2

from ornis.weights.checkpoint import DEFAULT_RGB_STATS

GLOBAL_VIEWS = 2  # DINOv2's two global crops per image


def _photometric(blur_p: float, solarize_p: float) -> tuple[list[Any], list[Any]]:
    """DINOv2's augmentations of one view: flip, colour jitter and grayscale, then Gaussian blur and solarisation
    (the second global view only), as (the ops applied to the PIL image, the ops applied to the uint8 tensor).

    The colour ops run on the PIL image, where torchvision's tensor path costs about 4x as much (1 ms against 0.24 ms
    per ColorJitter of a 32 px crop, most of a DINOv2 sample's augmentation time); the blur runs on the tensor, where
    its kernel size means what DINOv2's does (the PIL path converts to a tensor and back for it anyway)."""
    on_image: list[Any] = [
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    on_tensor: list[Any] = []
    if blur_p > 0:
        on_tensor.append(v2.RandomApply([v2.GaussianBlur(kernel_size=9, sigma=(0.1, 2.0))], p=blur_p))
    if solarize_p > 0:
        on_tensor.append(v2.RandomSolarize(threshold=128, p=solarize_p))
    return on_image, on_tensor


@dataclass(frozen=True)
class MultiCropConfig:
    """Crop sizes, the number of local crops and the scale ranges of both kinds."""

    global_size: int = 224
    local_size: int = 96
    local_crops: int = 8
    global_scale: tuple[float, float] = (0.32, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.32)
    photometric: bool = True  # DINOv2's flip, colour jitter, grayscale, blur and solarisation; False: crops only

    def __post_init__(self) -> None:
        for name in ("global_scale", "local_scale"):
            low, high = getattr(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"{name} must be two areas 0 < low <= high <= 1, found {low} {high}")

    def check_stride(self, stride: int, model: str) -> None:
        """``ValueError`` unless the crops are multiples of ``stride`` px (a backbone's coarsest, HieraDet's 32)."""
        sizes = {"global": self.global_size, **({"local": self.local_size} if self.local_crops else {})}
        bad = [f"{kind} crop of {size} px" for kind, size in sizes.items() if size % stride]
        if bad:
            raise ValueError(
                f"{model} takes inputs in multiples of {stride} px, not the {' or the '.join(bad)}: set "
                f"--global-size and --local-size to multiples of {stride}"
            )


class MultiCropTransform:
    """PIL image -> ``{"global_crops": [2 x (3, G, G)], "local_crops": [N x (3, L, L)]}``, normalised.

    Draws from torch's global RNG: the data pipeline seeds it per sample to make runs repeatable.
    """

    def __init__(self, config: MultiCropConfig, rgb_stats: Mapping[str, Sequence[float]] | None = None) -> None:
        stats = rgb_stats or DEFAULT_RGB_STATS
        self.config = config
        finish = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(stats["mean"]), std=list(stats["std"]))]
        bicubic = v2.InterpolationMode.BICUBIC

        def view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> Any:
            on_image, on_tensor = _photometric(blur_p, solarize_p) if config.photometric else ([], [])
            crop = v2.RandomResizedCrop(size, scale=scale, interpolation=bicubic, antialias=True)
            return v2.Compose([crop, *on_image, v2.PILToTensor(), *on_tensor, *finish])

        g, s = config.global_size, config.global_scale
        self.global_views = [view(g, s, 1.0, 0.0), view(g, s, 0.1, 0.2)]
        self.local_view = view(config.local_size, config.local_scale, 0.5, 0.0)

    def __call__(self, image: Any) -> dict[str, list[torch.Tensor]]:
        """The views of one image (converted to RGB first when it is a PIL image): 2 global, ``local_crops`` local."""
        image = image.convert("RGB") if hasattr(image, "convert") else image
        return {
            "global_crops": [view(image) for view in self.global_views],
            "local_crops": [self.local_view(image) for _ in range(self.config.local_crops)],
        }


def collate_views(samples: Sequence[Mapping[str, list[torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Stack views view-major, as DINOv2 does: ``global_crops`` is (2B, 3, G, G) with rows [view 0 of every sample,
    view 1 of every sample]; ``local_crops`` is (N*B, 3, L, L) likewise."""
    out = {}
    for key in ("global_crops", "local_crops"):
        views = len(samples[0][key])
        out[key] = torch.stack([s[key][v] for v in range(views) for s in samples]) if views else torch.empty(0)
    return out


def block_mask(
    grid: tuple[int, int], num_masked: int, rng: random.Random, min_block: int = 4, max_aspect: float = 3.3
) -> torch.Tensor:
    """A (h, w) bool mask of about ``num_masked`` patches made of random rectangles (BEiT / iBOT block masking).

    Rectangles of area in [min_block, what is left] and aspect ratio log-uniform in [1/max_aspect, max_aspect]
    are dropped until the budget is met; a rectangle that would overshoot is redrawn, and after 10 misses in a
    row the mask is returned as it is (so it may hold a few patches fewer than asked).
    """
    h, w = grid
    mask = torch.zeros(h, w, dtype=torch.bool)
    budget = min(num_masked, h * w)
    masked = 0
    misses = 0
    while masked < budget and misses < 10:
        left = budget - masked
        area = rng.uniform(min(min_block, left), left)
        aspect = math.exp(rng.uniform(-math.log(max_aspect), math.log(max_aspect)))
        bh = max(1, min(h, round(math.sqrt(area * aspect))))
        bw = max(1, min(w, round(math.sqrt(area / aspect))))
        top = rng.randint(0, h - bh)
        lft = rng.randint(0, w - bw)
        block = mask[top : top + bh, lft : lft + bw]
        new = int((~block).sum())
        if 0 < new <= left:
            block.fill_(True)
            masked += new
            misses = 0
        else:
            misses += 1
    return mask


def sample_masks(
    grid: tuple[int, int],
    views: int,
    rng: random.Random,
    probability: float = 0.5,
    ratio_range: tuple[float, float] = (0.1, 0.5),
) -> torch.Tensor:
    """The iBOT masks of one sample's ``views`` global views, (views, h*w) bool.

    ``probability * views`` of them are masked (the fraction by a coin flip), each over a ratio drawn uniformly
    from ``ratio_range`` of the grid. DINOv2 masks exactly that share of a batch's views; choosing per sample
    keeps the count exact (with the default 0.5 and two views: one masked view per image) while the masks stay a
    function of the sample alone, independent of how the batch is split over processes.
    """
    h, w = grid
    expected = probability * views
    count = int(expected) + (rng.random() < expected - int(expected))
    masked = set(rng.sample(range(views), min(count, views)))
    out = torch.zeros(views, h * w, dtype=torch.bool)
    for v in sorted(masked):
        ratio = rng.uniform(*ratio_range)
        out[v] = block_mask(grid, int(h * w * ratio), rng).flatten()
    return out


def mask_rng(sample_seed: int) -> random.Random:
    """The generator of one sample's masks. ``sample_seed`` is drawn with the sample's crops (from the loop's
    per-sample seed), so an image gets the same masks whatever the number of processes or its position in the
    batch, and a resumed run repeats them."""
    return random.Random(f"ibot:{sample_seed}")
