"""The one preprocessing path of ``infer_image`` and the batch runner: an image source -> an RGB image
(``open_rgb``) -> the checkpoint's ``classification_transform``.

``open_rgb`` decodes a path (or bytes) with ``ornis.data.decode.decode_image``, the call the batch runner's DataLoader
workers make for every file, and converts a PIL image with the same ``to_rgb``; so CMYK, palette, RGBA and 16-bit
images (scaled to 8 bits, not clipped) become the same RGB pixels, and the same rows, whichever way they come in.
The batch runner then cuts the transform in two (``split_transform``): the resize in the workers on uint8 pixels,
the scaling and normalisation on the model's device as the same torchvision functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict
from typing import Any, NamedTuple

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from ornis.data.decode import DecodeOptions, decode_image, to_rgb

ImageSource = Image.Image | str | os.PathLike | bytes


def open_rgb(sample: ImageSource, options: DecodeOptions | None = None) -> Image.Image:
    """A PIL image in RGB mode, from a path, the bytes of a file, or a PIL image in any mode.

    Files are decoded as the batch runner decodes them (``ImageDecodeError`` with a short reason for a file that is
    not a usable image). The default ``options`` keep EXIF orientation and alpha as Pillow's own ``convert("RGB")``
    does (ignored, dropped)."""
    options = options or DecodeOptions()
    if isinstance(sample, Image.Image):
        return to_rgb(sample, options)
    if isinstance(sample, (str, os.PathLike, bytes)):
        return decode_image(sample, options).image
    raise TypeError(f"expected a path or a PIL image, got {type(sample).__name__}")


class Normalization(NamedTuple):
    """The per-channel mean and standard deviation a transform normalises with."""

    mean: list[float]
    std: list[float]


def split_transform(
    transform: Callable[[Any], torch.Tensor],
) -> tuple[Callable[[Any], torch.Tensor], Normalization | None]:
    """A ``classification_transform`` cut before its uint8 -> float scaling and normalisation, which then run on the
    model's device (``normalize_on_device``). Returns (worker part, normalisation); other transforms are returned
    whole with ``None``."""
    steps = getattr(transform, "transforms", None)
    if (
        isinstance(transform, v2.Compose)
        and steps is not None
        and len(steps) >= 3
        and isinstance(steps[-3], v2.PILToTensor)
        and isinstance(steps[-2], v2.ToDtype)
        and isinstance(steps[-1], v2.Normalize)
        and steps[-2].scale
    ):
        return v2.Compose(list(steps[:-2])), Normalization(list(steps[-1].mean), list(steps[-1].std))
    return transform, None


def normalize_on_device(pixels: torch.Tensor, norm: Normalization) -> torch.Tensor:
    """The last two steps of a split ``classification_transform``, on a uint8 batch wherever it is."""
    return TF.normalize(TF.to_dtype(pixels, torch.float32, scale=True), norm.mean, norm.std)


def describe_preprocessing(
    size: tuple[int, int], rgb_stats: dict[str, Any], options: DecodeOptions, decode_on_device: bool
) -> dict[str, Any]:
    """What the batch runner stores as its Parquet files' ``ornis.preprocessing``."""
    return {
        "transform": "classification_transform",
        "size": list(size),
        "rgb_stats": {k: list(v) for k, v in rgb_stats.items()},
        "resize": "exact (H, W), bicubic, antialiased; center_crop 1.0",
        "jpeg_decoding": "torchvision decode_jpeg on the model's device" if decode_on_device else "Pillow",
        **asdict(options),
    }


__all__ = [
    "ImageSource",
    "Normalization",
    "describe_preprocessing",
    "normalize_on_device",
    "open_rgb",
    "split_transform",
]
