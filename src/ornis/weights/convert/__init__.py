"""Converters from upstream releases to checkpoints in the published format.

- ``convert_sam2``: SAM 2 / 2.1 checkpoints (the image encoder's Hiera trunk) -> ``hieradet_*``;
- ``convert_dinov2``: DINOv2 with registers, official torch-hub state dict or Hugging Face folder ->
  ``vit_reg*_nps_ls``.

Sources are read with ``torch.load(weights_only=True)`` or safetensors, never with full unpickling.
"""

from ornis.weights.convert.dinov2 import convert_dinov2
from ornis.weights.convert.sam2 import convert_sam2

__all__ = ["convert_dinov2", "convert_sam2"]
