"""One-off inference on a single image, with the reference's signature and results.

The image goes through ``open_rgb`` (``ornis.inference.preprocess``), the RGB conversion the batch runner uses, so
``infer_image`` and ``ornis embed`` see the same pixels for every kind of file (16-bit, palette, CMYK, RGBA).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import five_crop

from ornis.inference.preprocess import open_rgb

__all__ = ["infer_batch", "infer_image", "open_rgb"]


def infer_image(
    net: torch.nn.Module,
    sample: Image.Image | str | os.PathLike,
    transform: Callable[..., torch.Tensor],
    return_embedding: bool = False,
    tta: bool = False,
    return_logits: bool = False,
    device: torch.device | str | None = None,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Classify (and optionally embed) one image.

    Returns ``(out, embedding)``: ``out`` is (1, num_classes) probabilities (logits with ``return_logits``),
    ``embedding`` is (1, D) with ``return_embedding`` and ``None`` otherwise; both float32 NumPy arrays. Extra
    keyword arguments such as ``patch_size=24`` (FlexiViT) go to the model.
    """
    image = open_rgb(sample)
    device = torch.device(device) if device is not None else next(net.parameters()).device
    inputs = transform(image).unsqueeze(0).to(device)
    with torch.inference_mode():
        return infer_batch(
            net, inputs, return_embedding=return_embedding, tta=tta, return_logits=return_logits, **kwargs
        )


def infer_batch(
    net: torch.nn.Module,
    inputs: torch.Tensor,
    return_embedding: bool = False,
    tta: bool = False,
    return_logits: bool = False,
    **kwargs: Any,
) -> tuple[np.ndarray, np.ndarray | None]:
    """``infer_image`` for a preprocessed (B, 3, H, W) batch."""
    embedding = None
    if return_embedding:
        emb = net.embedding(inputs, **kwargs)
        logits = net.classify(emb)
        embedding = emb.float().cpu().numpy()
    elif tta:
        # Five 80% crops (corners and centre) resized back to the input size; probabilities averaged
        H, W = inputs.shape[-2:]
        resize = v2.Resize((H, W), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)
        outs = [
            _activate(net(resize(crop), **kwargs), return_logits)
            for crop in five_crop(inputs, [int(H * 0.8), int(W * 0.8)])
        ]
        return torch.stack(outs).mean(dim=0).float().cpu().numpy(), None
    else:
        logits = net(inputs, **kwargs)
    return _activate(logits, return_logits).float().cpu().numpy(), embedding


def _activate(logits: torch.Tensor, return_logits: bool) -> torch.Tensor:
    return logits if return_logits else F.softmax(logits, dim=1)
