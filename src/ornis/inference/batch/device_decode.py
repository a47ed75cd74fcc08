"""JPEGs decoded in batches on the model's device (nvJPEG on CUDA, libjpeg-turbo on CPU) and resized there to the
model's size (bicubic, antialiased), for when the CPUs cannot decode as fast as the GPU embeds."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from ornis.inference.batch.records import Batch


def decode_batch_jpegs(batch: Batch, device: torch.device, size: tuple[int, int]) -> tuple[torch.Tensor | None, Batch]:
    """The batch's pixels on ``device`` as uint8 at ``size``: the worker-decoded ones, then its JPEGs decoded here.
    A file the decoder rejects moves from the batch's samples to its failures (the returned batch)."""
    try:
        images: list[torch.Tensor | None] = list(decode_jpeg(batch.jpeg, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one bad file fails the whole batched call: find it
        images = []
        dropped: dict[int, str] = {}
        for j, data in enumerate(batch.jpeg):
            try:
                images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
            except RuntimeError as e:
                images.append(None)
                dropped[batch.decoded_count + j] = f"corrupt or truncated JPEG ({_decoder_message(e)})"
        batch = batch.without(dropped)
    kept = [im for im in images if im is not None]
    parts = [batch.pixels.to(device, non_blocking=True)] if batch.pixels is not None else []
    if kept:
        parts.append(resize_on_device(kept, size))
    return (torch.cat(parts) if parts else None), batch


def resize_on_device(images: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3, h, w) images of any sizes -> one uint8 (N, 3, H, W) batch, bicubic with antialiasing."""
    h, w = size
    out = torch.empty((len(images), 3, h, w), dtype=torch.uint8, device=images[0].device)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for j, im in enumerate(images):
        by_shape.setdefault(tuple(im.shape), []).append(j)
    for indices in by_shape.values():  # photos share a few sizes: one interpolation per size
        x = torch.stack([images[j] for j in indices]).float()
        x = F.interpolate(x, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        out[indices] = x.round_().clamp_(0, 255).to(torch.uint8)
    return out


def _decoder_message(e: RuntimeError) -> str:
    # torchvision puts the decoder's own words last, after its C++ context: "..., Image is incomplete or truncated"
    return str(e).splitlines()[-1].split(", ")[-1][:200]
