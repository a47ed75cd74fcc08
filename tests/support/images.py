"""Small test images of every kind the decoder must handle: good ones (each colour mode and format) and bad ones
(empty, truncated, corrupt, not an image, decompression bomb), written to a folder."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

# kind of bad file -> what its ImageDecodeError's reason contains
BAD_REASONS = {
    "empty": "empty",
    "truncated": "truncated",
    "corrupt": "corrupt",
    "not_an_image": "not an image",
    "bomb": "decompression bomb",
}


def random_rgb(h: int = 30, w: int = 40, seed: int = 0) -> Image.Image:
    """An RGB image of uniform noise."""
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    """``image`` saved in format ``fmt`` (Pillow's ``save`` options in ``kw``)."""
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def with_alpha(image: Image.Image) -> Image.Image:
    """``image`` as RGBA, its left half transparent and its right half opaque."""
    rgba = image.convert("RGBA")
    alpha = np.zeros(image.size[::-1], np.uint8)
    alpha[:, image.width // 2 :] = 255
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def ramp16() -> np.ndarray:
    """A 30x40 16-bit ramp over the full range 0..65535."""
    return (np.arange(30 * 40, dtype=np.float64).reshape(30, 40) * (65535 / (30 * 40 - 1))).astype(np.uint16)


def orientation_exif(value: int) -> Image.Exif:
    """EXIF data holding only an orientation tag."""
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def _write(folder: Path, files: dict[str, tuple[str, bytes]]) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for kind, (name, data) in files.items():
        (folder / name).write_bytes(data)
        out[kind] = folder / name
    return out


def make_good_images(folder: Path) -> dict[str, Path]:
    """One file of each good kind, small. Returns kind -> path."""
    base = random_rgb()
    return _write(
        folder,
        {
            "rgb_jpeg": ("rgb.jpg", encode(base, "JPEG", quality=90)),
            "cmyk_jpeg": ("cmyk.jpg", encode(base.convert("CMYK"), "JPEG", quality=90)),
            "gray_png": ("gray.png", encode(base.convert("L"), "PNG")),
            "palette_png": ("palette.png", encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")),
            "palette_transparent_gif": (
                "transparent.gif",
                encode(base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF", transparency=0),
            ),
            "rgba_png": ("rgba.png", encode(with_alpha(base), "PNG")),
            "la_png": ("la.png", encode(with_alpha(base).convert("LA"), "PNG")),
            "gray16_png": ("gray16.png", encode(Image.fromarray(ramp16()), "PNG")),
            "gray16_tiff": ("gray16.tif", encode(Image.fromarray(ramp16()), "TIFF")),
            "exif_rotated_jpeg": ("rotated.jpg", encode(random_rgb(20, 50, seed=1), "JPEG", exif=orientation_exif(6))),
            "webp": ("photo.webp", encode(base, "WEBP", lossless=True)),
            "bmp": ("photo.bmp", encode(base, "BMP")),
        },
    )


def make_bad_images(folder: Path) -> dict[str, Path]:
    """One file of each bad kind. Returns kind -> path; the decompression bomb needs max_pixels <= 1_000_000."""
    jpeg = encode(random_rgb(60, 80, seed=2), "JPEG", quality=95)
    png = bytearray(encode(random_rgb(30, 40, seed=3), "PNG"))
    png[70:90] = b"\x00" * 20  # inside the compressed IDAT stream
    return _write(
        folder,
        {
            "empty": ("empty.jpg", b""),
            "truncated": ("truncated.jpg", jpeg[: len(jpeg) // 2]),
            "corrupt": ("corrupt.png", bytes(png)),
            "not_an_image": ("notes.jpg", b"these are field notes, not a photo\n" * 20),
            "bomb": ("bomb.png", encode(Image.new("1", (2000, 1000)), "PNG")),
        },
    )


def make_job_inputs(root: Path, count: int) -> tuple[Path, Path]:
    """A tiny 3-class ``vit_t16`` checkpoint (seed 0) and a folder of ``count`` random JPEGs of a few sizes plus one
    empty ``zero.jpg``: what the distributed batch tests (torchrun, Ray) embed."""
    import torch

    import ornis

    torch.manual_seed(0)
    ckpt = ornis.save_model(ornis.build_model("vit_t16", num_classes=3, size=32), root / "vit_t16_tiny.pt")
    photos = root / "photos"
    photos.mkdir()
    rng = np.random.default_rng(1)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (24 + i % 7, 40, 3), dtype=np.uint8)).save(photos / f"p{i:03d}.jpg")
    (photos / "zero.jpg").write_bytes(b"")
    return ckpt, photos


def noisy_tiny_model(num_classes: int = 7):
    """A 32 px ``vit_t16`` (seed 0) with every weight drawn from N(0, 0.05): no zero-initialised head hiding a
    mistake in the classify path."""
    import torch

    import ornis

    torch.manual_seed(0)
    net = ornis.build_model("vit_t16", num_classes=num_classes, size=32)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    return net
