"""Robust decoding: every good kind of image becomes RGB (as open_rgb makes it), every bad kind a reason."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ornis.data.decode import DecodeOptions, ImageDecodeError, decode_image
from ornis.inference.classification import open_rgb


def _rgb(h: int = 30, w: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _bytes(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def make_good_images(folder: Path) -> dict[str, Path]:
    """One file of each good kind, small. Returns kind -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    base = _rgb()
    files = {
        "rgb_jpeg": ("rgb.jpg", _bytes(base, "JPEG", quality=90)),
        "cmyk_jpeg": ("cmyk.jpg", _bytes(base.convert("CMYK"), "JPEG", quality=90)),
        "gray_png": ("gray.png", _bytes(base.convert("L"), "PNG")),
        "palette_png": ("palette.png", _bytes(base.convert("P", palette=Image.Palette.ADAPTIVE), "PNG")),
        "palette_transparent_gif": (
            "transparent.gif",
            _bytes(base.convert("P", palette=Image.Palette.ADAPTIVE), "GIF", transparency=0),
        ),
        "rgba_png": ("rgba.png", _bytes(_with_alpha(base), "PNG")),
        "la_png": ("la.png", _bytes(_with_alpha(base).convert("LA"), "PNG")),
        "gray16_png": ("gray16.png", _bytes(Image.fromarray(_ramp16()), "PNG")),
        "gray16_tiff": ("gray16.tif", _bytes(Image.fromarray(_ramp16()), "TIFF")),
        "exif_rotated_jpeg": ("rotated.jpg", _bytes(_rgb(20, 50, seed=1), "JPEG", exif=_orientation_exif(6))),
        "webp": ("photo.webp", _bytes(base, "WEBP", lossless=True)),
        "bmp": ("photo.bmp", _bytes(base, "BMP")),
    }
    out = {}
    for kind, (name, data) in files.items():
        (folder / name).write_bytes(data)
        out[kind] = folder / name
    return out


def make_bad_images(folder: Path) -> dict[str, Path]:
    """One file of each bad kind. Returns kind -> path; the decompression bomb needs max_pixels <= 1_000_000."""
    folder.mkdir(parents=True, exist_ok=True)
    jpeg = _bytes(_rgb(60, 80, seed=2), "JPEG", quality=95)
    png = bytearray(_bytes(_rgb(30, 40, seed=3), "PNG"))
    png[70:90] = b"\x00" * 20  # inside the compressed IDAT stream
    files = {
        "empty": ("empty.jpg", b""),
        "truncated": ("truncated.jpg", jpeg[: len(jpeg) // 2]),
        "corrupt": ("corrupt.png", bytes(png)),
        "not_an_image": ("notes.jpg", b"these are field notes, not a photo\n" * 20),
        "bomb": ("bomb.png", _bytes(Image.new("1", (2000, 1000)), "PNG")),
    }
    out = {}
    for kind, (name, data) in files.items():
        (folder / name).write_bytes(data)
        out[kind] = folder / name
    return out


BAD_REASONS = {
    "empty": "empty",
    "truncated": "truncated",
    "corrupt": "corrupt",
    "not_an_image": "not an image",
    "bomb": "decompression bomb",
}


def _with_alpha(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = np.zeros(image.size[::-1], np.uint8)
    alpha[:, image.width // 2 :] = 255
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _ramp16() -> np.ndarray:
    return (np.arange(30 * 40, dtype=np.float64).reshape(30, 40) * (65535 / (30 * 40 - 1))).astype(np.uint16)


def _orientation_exif(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_good_images(tmp_path_factory.mktemp("good"))


@pytest.fixture(scope="module")
def bad(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_bad_images(tmp_path_factory.mktemp("bad"))


def test_good_images_match_open_rgb(good: dict[str, Path]) -> None:
    for kind, path in good.items():
        decoded = decode_image(path)
        assert decoded.image.mode == "RGB", kind
        assert (decoded.width, decoded.height) == Image.open(path).size, kind
        if kind.startswith("gray16"):
            continue
        np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(open_rgb(path)), err_msg=kind)


def test_sixteen_bit_is_scaled_not_clipped(good: dict[str, Path]) -> None:
    ramp = _ramp16()
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    for kind in ("gray16_png", "gray16_tiff"):
        decoded = np.asarray(decode_image(good[kind]).image)
        np.testing.assert_array_equal(decoded[..., 0], expected)
        assert decoded.min() == 0 and decoded.max() == 255
        # Pillow's own conversion clips: nearly every pixel of the ramp would be white
        clipped = np.asarray(open_rgb(good[kind]))[..., 0]
        assert (clipped == 255).mean() > 0.9


def test_alpha_dropped_by_default_composited_on_request(good: dict[str, Path]) -> None:
    plain = np.asarray(Image.open(good["rgba_png"]).convert("RGB"))
    dropped = np.asarray(decode_image(good["rgba_png"]).image)
    np.testing.assert_array_equal(dropped, plain)
    composited = np.asarray(decode_image(good["rgba_png"], DecodeOptions(composite_alpha=True)).image)
    half = composited.shape[1] // 2
    assert (composited[:, :half] == 255).all()  # transparent half -> white
    np.testing.assert_array_equal(composited[:, half:], plain[:, half:])  # opaque half unchanged


def test_exif_transpose_is_an_option(good: dict[str, Path]) -> None:
    path = good["exif_rotated_jpeg"]
    as_stored = decode_image(path)
    assert (as_stored.width, as_stored.height) == (50, 20)
    rotated = decode_image(path, DecodeOptions(exif_transpose=True))
    assert (rotated.width, rotated.height) == (20, 50)  # orientation 6: rotate 90 degrees clockwise


def test_bad_images_give_reasons(bad: dict[str, Path]) -> None:
    options = DecodeOptions(max_pixels=1_000_000)
    for kind, path in bad.items():
        with pytest.raises(ImageDecodeError) as info:
            decode_image(path, options)
        assert BAD_REASONS[kind] in info.value.reason, (kind, info.value.reason)
        assert info.value.source == str(path)


def test_missing_file_is_an_error_not_a_crash(tmp_path: Path) -> None:
    with pytest.raises(ImageDecodeError, match="file not found"):
        decode_image(tmp_path / "nope.jpg")


def test_default_limit_catches_a_real_bomb() -> None:
    bomb = _bytes(Image.new("1", (12000, 8000)), "PNG")  # 96 Mpx in 12 kB
    assert len(bomb) < 50_000
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bomb)
