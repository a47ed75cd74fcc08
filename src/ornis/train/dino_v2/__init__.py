"""DINOv2 self-distillation: losses, centring, head, multi-crop views and masks, student/teacher, the recipe."""

from ornis.train.dino_v2.meta_arch import HeadConfig
from ornis.train.dino_v2.multicrop import MultiCropConfig
from ornis.train.dino_v2.recipe import DinoV2Config, DinoV2Options, DinoV2Recipe, DinoV2Views, train_dino_v2

__all__ = [
    "DinoV2Config",
    "DinoV2Options",
    "DinoV2Recipe",
    "DinoV2Views",
    "HeadConfig",
    "MultiCropConfig",
    "train_dino_v2",
]
