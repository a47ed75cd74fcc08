"""Robust decoding: every good kind of image becomes RGB (as open_rgb makes it), every bad kind a reason."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from support.images import BAD_REASONS, encode, make_bad_images, make_good_images, ramp16

from ornis.data.decode import DecodeOptions, ImageDecodeError, _read_capped, decode_image, read_image_bytes
from ornis.inference.classification import open_rgb


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
        np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(open_rgb(path)), err_msg=kind)


def test_sixteen_bit_is_scaled_not_clipped(good: dict[str, Path]) -> None:
    ramp = ramp16()
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    for kind in ("gray16_png", "gray16_tiff"):
        decoded = np.asarray(decode_image(good[kind]).image)
        np.testing.assert_array_equal(decoded[..., 0], expected)
        assert decoded.min() == 0 and decoded.max() == 255
        # Pillow's own conversion clips: nearly every pixel of the ramp would be white
        clipped = np.asarray(Image.open(good[kind]).convert("RGB"))[..., 0]
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
    bomb = encode(Image.new("1", (12000, 8000)), "PNG")  # 96 Mpx in 12 kB
    assert len(bomb) < 50_000
    with pytest.raises(ImageDecodeError, match="decompression bomb"):
        decode_image(bomb)


def _in_thread(call, seconds: float = 10.0):
    """``call()``'s result or exception, or a failure when it does not return in ``seconds`` (a blocked read)."""
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["result"] = call()
        except Exception as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds} s"
    return box


def test_special_files_are_refused_before_reading(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "x.jpg")
    os.symlink("/dev/urandom", tmp_path / "r.jpg")
    (tmp_path / "d.jpg").mkdir()
    kinds = {"x.jpg": "a FIFO", "r.jpg": "a character device", "d.jpg": "a folder"}
    for name, kind in kinds.items():
        box = _in_thread(lambda name=name: decode_image(tmp_path / name))
        error = box.get("error")
        assert isinstance(error, ImageDecodeError), (name, box)
        assert error.reason == f"not a regular file ({kind}); skipped without reading"


def test_reads_stop_at_the_byte_limit(tmp_path: Path, good: dict[str, Path]) -> None:
    data = good["rgb_jpeg"].read_bytes()
    assert read_image_bytes(good["rgb_jpeg"], max_bytes=len(data)) == data
    with pytest.raises(ImageDecodeError, match=f"file too large \\({len(data)} bytes, limit {len(data) - 1}\\)"):
        read_image_bytes(good["rgb_jpeg"], max_bytes=len(data) - 1)
    with pytest.raises(ImageDecodeError, match="file too large"):
        decode_image(data, DecodeOptions(max_bytes=100))
    # A file that grows after its size was read is still read no further than the limit
    with open(good["rgb_jpeg"], "rb") as f:
        assert len(_read_capped(f, 10, 1000)) == 1000
    with pytest.raises(ValueError, match="max_bytes must be a positive integer, got 0"):
        DecodeOptions(max_bytes=0)
    with pytest.raises(ValueError, match="max_pixels must be a positive integer, got -1"):
        DecodeOptions(max_pixels=-1)
