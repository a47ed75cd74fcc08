"""Settings for small, plain images (digits, icons, 32 px crops), where DINOv2's published views do not learn, and
the rule that chooses them.

DINOv2's crops and colour jitter leave the two views of such an image so unlike each other that the teacher's targets
stay uniform and the DINO term carries no signal. Crops only, milder, with a faster and sharper teacher, made it learn
on scikit-learn's digits at 32 px (k-NN 0.660, 0.615 and 0.728 at seeds 0, 1 and 2 against DINOv2's views' 0.607,
0.431 and 0.514; the README's training section has the curves). DINOv2's views were made for global crops of 224 px
and local ones of 96 px; ``ornis train dino-v2`` takes these settings instead when the global crops are smaller
than DINOv2's local ones (``small_images_for``). A ``MultiCropConfig`` / ``DinoV2Config`` built by hand keeps the
published values at any size.
"""

from __future__ import annotations

from typing import Any

# MultiCropConfig fields
SMALL_IMAGES_CROPS: dict[str, Any] = {"global_scale": (0.8, 1.0), "local_scale": (0.3, 0.6), "photometric": False}
# DinoV2Config fields
SMALL_IMAGES_METHOD: dict[str, Any] = {"momentum_teacher": 0.96, "teacher_temp": 0.04, "warmup_teacher_temp": 0.04}


# Global crops under this many px (DINOv2's own local crop size) get the small-image settings unless told otherwise
SMALL_IMAGES_BELOW = 96


def small_images_for(flag: bool | None, global_size: int) -> bool:
    """``flag`` when given (``--small-images`` / ``--no-small-images``), else whether ``global_size`` is under
    ``SMALL_IMAGES_BELOW``: smaller than any view DINOv2's published augmentations were made for."""
    return flag if flag is not None else global_size < SMALL_IMAGES_BELOW


def settings(given: dict[str, Any], preset: dict[str, Any], small_images: bool) -> dict[str, Any]:
    """Keyword arguments for a config: each value given (not ``None``), else ``preset``'s where ``small_images`` is on.

    A name in neither keeps the config's own default, so ``--small-images --teacher-temp 0.07`` takes the preset's
    crops and momentum with the temperature given.
    """
    chosen = dict(preset) if small_images else {}
    return chosen | {name: value for name, value in given.items() if value is not None}
