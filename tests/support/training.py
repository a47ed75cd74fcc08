"""Training fixtures shared by the ``test_train_*`` modules (and the torchrun scripts they start): generated image
folders and shards, tiny model configs, and the tiny DINOv2 recipe."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

import ornis
from ornis.train.data import ImageFolderSource, SampleDataset, open_source
from ornis.train.dino_v2 import DinoV2Config, DinoV2Recipe, DinoV2Views, HeadConfig, MultiCropConfig

SHAPES = (("circle", (220, 40, 40)), ("square", (40, 200, 40)), ("triangle", (40, 40, 220)))
STATS = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
TINY_VIT = dict(num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, patch_size=8)


def shape_image(kind: str, color: tuple[int, int, int], rng: np.random.Generator, size: int = 48) -> Image.Image:
    """A coloured circle / square / triangle of random size and place on a grey noisy background."""
    img = Image.fromarray(rng.integers(90, 160, size=(size, size, 3), dtype=np.uint8))
    draw = ImageDraw.Draw(img)
    r = int(rng.integers(size // 5, size // 3))
    x, y = (int(v) for v in rng.integers(r, size - r, size=2))
    fill = tuple(int(v) for v in np.clip(np.array(color) + rng.integers(-30, 30, 3), 0, 255))
    if kind == "circle":
        draw.ellipse([x - r, y - r, x + r, y + r], fill=fill)
    elif kind == "square":
        draw.rectangle([x - r, y - r, x + r, y + r], fill=fill)
    else:
        draw.polygon([(x, y - r), (x - r, y + r), (x + r, y + r)], fill=fill)
    return img


def make_shapes(root: Path, per_class: int = 12, seed: int = 0, size: int = 48, labelled: bool = True) -> Path:
    """ImageFolder layout ``root/<shape>/<i>.png``; unlabelled: the same images scattered in nested folders."""
    rng = np.random.default_rng(seed)
    for kind, color in SHAPES:
        for i in range(per_class):
            folder = root / kind if labelled else root / f"batch{i % 3}" / ("deeper" if i % 2 else "")
            folder.mkdir(parents=True, exist_ok=True)
            shape_image(kind, color, rng, size).save(folder / f"{kind}_{i}.png")
    return root


def write_shards(folder: Path, root: Path, shards: int = 2) -> list[Path]:
    """Webdataset shards of the labelled folder ``root``: ``<key>.png`` + ``<key>.cls`` per sample."""
    source = ImageFolderSource(root)
    paths = [folder / f"shard-{i:04d}.tar" for i in range(shards)]
    tars = [tarfile.open(p, "w") for p in paths]
    for i, (path, label) in enumerate(source.samples):
        tar = tars[i % shards]
        for ext, data in (("png", path.read_bytes()), ("cls", str(label).encode())):
            info = tarfile.TarInfo(f"sample{i:05d}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    for t in tars:
        t.close()
    return paths


# -- DINOv2 -------------------------------------------------------------------------------------------------------
CROPS = MultiCropConfig(global_size=64, local_size=32, local_crops=2)
HEADS = HeadConfig(out_dim=16, hidden_dim=64, bottleneck_dim=32)
TINY_DINO = {"num_layers": 2}  # vit_t16 / flexivit_t16 widths, two blocks
TINY_HIERADET = {"depths": (1, 1, 1, 1), "global_att_blocks": (), "embed_dim": 32}  # one block a stage, 32..256 wide


def stripes(n: int, size: int = 64, seed: int = 0) -> list[Image.Image]:
    """Two-colour stripes of random angle and frequency: every image is easy to tell from the others by colour and
    texture, so crops of one image can learn to agree."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = []
    for _ in range(n):
        angle, freq = rng.uniform(0, np.pi), rng.uniform(2, 8)
        c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        on = (np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy)) > 0)[..., None]
        out.append(Image.fromarray(np.where(on, c1, c2).astype(np.uint8)))
    return out


def dino_recipe(arch: str = "vit_t16", **method: Any) -> DinoV2Recipe:
    """A tiny DINOv2 recipe (seeded), sharpened teacher, fast EMA."""
    torch.manual_seed(0)
    net = ornis.build_model(arch, size=CROPS.global_size, config=TINY_HIERADET if "hieradet" in arch else TINY_DINO)
    cfg = DinoV2Config(**{"heads": HEADS, "teacher_temp": 0.04, "momentum_teacher": 0.99, **method})
    return DinoV2Recipe(net, cfg, CROPS, seed=0)


def dino_dataset(folder: Path) -> SampleDataset:
    """The multi-crop views of every image under ``folder``."""
    return SampleDataset(open_source(folder, labelled=False), DinoV2Views(CROPS))


def write_digits(root: Path, train_count: int = 1400, size: int = 32) -> tuple[Path, Path]:
    """scikit-learn's 1,797 scanned digits (real images no one here made) as ``root/{train,val}/<digit>/<i>.png``,
    8 px upscaled to ``size`` px (bicubic, RGB), shuffled with seed 0: ``train_count`` for training, the rest
    held out."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    for rank, i in enumerate(np.random.default_rng(0).permutation(len(digits.images))):
        folder = root / ("train" if rank < train_count else "val") / str(digits.target[i])
        folder.mkdir(parents=True, exist_ok=True)
        pixels = (digits.images[i] * (255 / 16)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).resize((size, size), Image.BICUBIC).convert("RGB").save(folder / f"{i:04d}.png")
    return root / "train", root / "val"
