"""Procedurally generated images with known labels: the data the shipped demo model is trained and measured on.

Eight classes, five shapes and three textures. Hue, size, position, rotation, background and clutter are random
and independent of the class (the figure is always darker than its ground), so only the form tells the classes
apart: a model must look at shape and texture, not at a colour histogram. Every image is a pure function of
``(seed, index)``, so a "held-out set" is just a different seed and nothing needs to be stored.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHAPE_CLASSES = ("checker", "circle", "cross", "dots", "ring", "square", "stripes", "triangle")


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, size=3))


def _light_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(140, 256, size=3))


def _dark_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 110, size=3))


def _background(rng: np.random.Generator, size: int) -> tuple[Image.Image, tuple[int, int, int]]:
    base = np.array(_light_colour(rng), dtype=np.float32)
    tilt = rng.normal(0, 15, size=(2, 3)).astype(np.float32)
    ramp = np.linspace(-1, 1, size, dtype=np.float32)
    img = base + ramp[:, None, None] * tilt[0] + ramp[None, :, None] * tilt[1]
    img += rng.normal(0, 6, size=(size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), tuple(int(v) for v in base)


def _polygon(cx: float, cy: float, r: float, sides: int, angle: float) -> list[tuple[float, float]]:
    return [
        (cx + r * math.cos(angle + 2 * math.pi * i / sides), cy + r * math.sin(angle + 2 * math.pi * i / sides))
        for i in range(sides)
    ]


def _rotated(points: list[tuple[float, float]], cx: float, cy: float, angle: float) -> list[tuple[float, float]]:
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + (x - cx) * c - (y - cy) * s, cy + (x - cx) * s + (y - cy) * c) for x, y in points]


def _texture_mask(kind: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A boolean (size, size) pattern: oriented stripes, a rotated checkerboard or a dot lattice."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    angle = rng.uniform(0, math.pi)
    period = rng.uniform(9, 14)
    u = xx * math.cos(angle) + yy * math.sin(angle)
    v = -xx * math.sin(angle) + yy * math.cos(angle)
    phase_u, phase_v = rng.uniform(0, period, size=2)
    if kind == "stripes":
        return ((u + phase_u) % period) < period / 2
    if kind == "checker":
        return (((u + phase_u) // (period / 1.5) + (v + phase_v) // (period / 1.5)) % 2) == 0
    # dots: discs on a lattice
    cell = period * 1.2
    du = (u + phase_u) % cell - cell / 2
    dv = (v + phase_v) % cell - cell / 2
    return du * du + dv * dv < (cell * 0.28) ** 2


def render_shape(label: int, rng: np.random.Generator, size: int = 64) -> Image.Image:
    """One RGB image of class ``SHAPE_CLASSES[label]``."""
    kind = SHAPE_CLASSES[label]
    # Hue is random, but the figure is darker than the ground: one polarity, so edges look alike in every image
    img, _ = _background(rng, size)
    fg = _dark_colour(rng)
    draw = ImageDraw.Draw(img)
    r = rng.uniform(0.22, 0.36) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    if kind in ("stripes", "checker", "dots"):
        # The texture fills a random region (an ellipse or a rotated rectangle), so the outline says nothing
        region = Image.new("L", (size, size), 0)
        rdraw = ImageDraw.Draw(region)
        if rng.random() < 0.5:
            rdraw.ellipse([cx - r * 1.2, cy - r, cx + r * 1.2, cy + r], fill=255)
        else:
            rdraw.polygon(_polygon(cx, cy, r * 1.4, 4, angle), fill=255)
        pattern = _texture_mask(kind, size, rng)
        mask = Image.fromarray((pattern * (np.asarray(region) > 0)).astype(np.uint8) * 255)
        img.paste(Image.new("RGB", (size, size), fg), (0, 0), mask)
    elif kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fg)
    elif kind == "ring":
        width = max(3, int(r * rng.uniform(0.3, 0.45)))
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=fg, width=width)
    elif kind == "square":
        draw.polygon(_polygon(cx, cy, r * 1.15, 4, angle), fill=fg)
    elif kind == "triangle":
        draw.polygon(_polygon(cx, cy, r * 1.2, 3, angle), fill=fg)
    elif kind == "cross":
        t = r * rng.uniform(0.28, 0.42)
        bar1 = [(cx - r, cy - t), (cx + r, cy - t), (cx + r, cy + t), (cx - r, cy + t)]
        bar2 = [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy + r), (cx - t, cy + r)]
        draw.polygon(_rotated(bar1, cx, cy, angle), fill=fg)
        draw.polygon(_rotated(bar2, cx, cy, angle), fill=fg)
    # Clutter: small blobs of random colours that belong to no class
    for _ in range(int(rng.integers(0, 3))):
        br = rng.uniform(1.5, 3.5)
        bx, by = rng.uniform(0, size, size=2)
        draw.ellipse([bx - br, by - br, bx + br, by + br], fill=_random_colour(rng))
    if rng.random() < 0.15:
        img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    return img


def generate_shapes(count: int, seed: int, size: int = 64) -> tuple[list[Image.Image], np.ndarray]:
    """``count`` images with balanced labels (class ``i % 8``); image ``i`` depends only on ``(seed, i)``."""
    labels = np.arange(count) % len(SHAPE_CLASSES)
    images = [render_shape(int(label), np.random.default_rng([seed, i]), size) for i, label in enumerate(labels)]
    return images, labels


def write_shapes_folder(
    root: str | os.PathLike, count: int, seed: int, size: int = 64, save_size: int | None = None
) -> Path:
    """Write ``count`` generated images as ``root/<class>/<seed>_<i>.png`` (the folder-per-class layout), drawn at
    ``size`` and stored at ``save_size`` (bicubic, antialiased) when given: a model with a smaller input then
    decodes 4x fewer pixels per sample."""
    root = Path(root)
    images, labels = generate_shapes(count, seed, size)
    for name in SHAPE_CLASSES:
        (root / name).mkdir(parents=True, exist_ok=True)
    for i, (img, label) in enumerate(zip(images, labels)):
        if save_size is not None and save_size != size:
            img = img.resize((save_size, save_size), Image.Resampling.BICUBIC, reducing_gap=None)
        img.save(root / SHAPE_CLASSES[int(label)] / f"{seed}_{i:06d}.png")
    return root


def write_sample_images(folder: str | os.PathLike, per_class: int = 2, seed: int = 3, size: int = 64) -> list[Path]:
    """The sample images that ship in ``ornis/assets/samples``: ``<class>_<n>.jpg``, a few KB each."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for label, name in enumerate(SHAPE_CLASSES):
        for n in range(per_class):
            path = folder / f"{name}_{n}.jpg"
            render_shape(label, np.random.default_rng([seed, label, n]), size).save(path, quality=92)
            paths.append(path)
    return paths
