"""Robust image decoding for batch work: every file either becomes an RGB image or a reason why not.

Good images, converted to RGB the way ``ornis.inference.classification.open_rgb`` does (``Image.convert("RGB")``),
so that batch rows equal ``infer_image``'s output:

- CMYK, grayscale (L, LA), palette (P, PA) and RGBA: converted by Pillow. Alpha is **dropped** by default (as
  ``open_rgb`` does); ``composite_alpha=True`` composites on white instead.
- 16-bit images (``I;16*`` / ``I`` modes, e.g. 16-bit grayscale PNG or TIFF): Pillow's own conversion clips every
  value above 255 to white, so these are scaled to 8 bits properly (``round(v / 257)``) before the RGB conversion.
  ``open_rgb`` (``ornis.inference.preprocess``) uses this same conversion, so ``infer_image`` agrees with the
  batch path. (16-bit RGB PNGs are already opened by Pillow as 8-bit RGB from the high bytes.)
- EXIF orientation is ignored by default (as ``infer_image`` does); ``exif_transpose=True`` applies it.

Bad files raise ``ImageDecodeError`` with a short reason: not a regular file (a FIFO, a device such as a symlink to
``/dev/urandom``, a folder named like an image: checked with ``stat`` before anything is opened, so nothing hangs
or reads without end), too large (more bytes than ``max_bytes``, checked before reading and while reading), empty
(0 bytes), not an image, truncated, corrupt, decompression bomb (more pixels than ``max_pixels``; ``decode_image``
also sets Pillow's global ``Image.MAX_IMAGE_PIXELS`` to it and turns ``DecompressionBombWarning`` into an error).
"""

from __future__ import annotations

import io
import os
import stat
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ornis.errors import OrnisError, first_line
from ornis.utils.storage import RemotePath, StorageError, is_remote, read_bytes

# Pillow's own default (89.5 Mpx; a 12-bit 200 Mpx scan is rare in photo collections). Set explicitly so that the
# bomb check does not depend on what another library did to the global, and raised rather than warned about.
DEFAULT_MAX_PIXELS = 89_478_485
# The largest file read as an image: 1 GiB holds an uncompressed 16-bit RGB TIFF at the pixel limit with room to
# spare; anything larger is not a photo, and is never read into memory.
DEFAULT_MAX_BYTES = 1 << 30

IMAGE_EXTENSIONS = frozenset(
    {
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".png",
        ".gif",
        ".bmp",
        ".dib",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".tga",
        ".ico",
        ".jp2",
        ".j2k",
        ".avif",
        ".heic",
        ".heif",
        ".sgi",
        ".pcx",
        ".psd",
    }
)

# How much of a lower-level error message a reason quotes (reasons are one line of the errors file).
REASON_LIMIT = 200

_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")


class ImageDecodeError(OrnisError):
    """A file that cannot be used as an image; ``reason`` is short and meant for the errors file."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"{source}: {reason}")


@dataclass(frozen=True)
class DecodeOptions:
    """How files become RGB images. The defaults give exactly what ``infer_image`` sees."""

    exif_transpose: bool = False
    composite_alpha: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES

    def __post_init__(self) -> None:
        for name in ("max_pixels", "max_bytes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")


class DecodedImage(NamedTuple):
    """A decoded image and its size."""

    image: Image.Image  # RGB
    width: int  # of the decoded image (after EXIF transposition when that is on)
    height: int


def decode_image(
    data: bytes | str | os.PathLike, options: DecodeOptions = DecodeOptions(), source: str | None = None
) -> DecodedImage:
    """Bytes or a path -> an RGB PIL image and its size; ``ImageDecodeError`` for anything that is not a usable
    image."""
    if source is None:
        source = "<bytes>" if isinstance(data, bytes) else os.fspath(data)
    if not isinstance(data, bytes):
        data = read_image_bytes(data, source, options.max_bytes)
    elif len(data) > options.max_bytes:
        raise ImageDecodeError(source, f"file too large ({len(data)} bytes, limit {options.max_bytes})")
    if len(data) == 0:
        raise ImageDecodeError(source, "empty file (0 bytes)")
    Image.MAX_IMAGE_PIXELS = options.max_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise ImageDecodeError(source, "not an image (no known image format)") from None
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError(source, f"decompression bomb ({e})") from None
        except Exception as e:  # noqa: BLE001 - Pillow's plugins raise anything on malformed headers
            raise ImageDecodeError(
                source, f"corrupt header ({type(e).__name__}: {first_line(e, REASON_LIMIT)})"
            ) from None
        width, height = image.size
        if width * height > options.max_pixels:
            raise ImageDecodeError(
                source, f"decompression bomb ({width}x{height} = {width * height} pixels, limit {options.max_pixels})"
            )
        try:
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageDecodeError(source, f"decompression bomb ({e})") from None
        except OSError as e:
            text = first_line(e, REASON_LIMIT)
            kind = "truncated" if "truncated" in text else "corrupt"
            raise ImageDecodeError(source, f"{kind} ({text})") from None
        except Exception as e:  # noqa: BLE001
            raise ImageDecodeError(source, f"corrupt ({type(e).__name__}: {first_line(e, REASON_LIMIT)})") from None
    try:
        rgb = to_rgb(image, options)
    except Exception as e:  # noqa: BLE001
        raise ImageDecodeError(
            source, f"cannot convert mode {image.mode} to RGB ({first_line(e, REASON_LIMIT)})"
        ) from None
    return DecodedImage(rgb, rgb.width, rgb.height)


def read_image_bytes(path: str | os.PathLike, source: str | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of an image file; ``ImageDecodeError`` when there are none to use: "file not found", "not a regular
    file (...)", "file too large (...)", "cannot read file (...)".

    Only a regular file is opened (``stat`` first, so a FIFO cannot block and a device cannot stream), and then
    without blocking and checked again on the open file (it may have been swapped since); at most ``max_bytes`` + 1
    bytes are ever read, so a file that grows while being read cannot exhaust the memory either. An object in
    object storage (a URL) is read with one ranged GET of at most ``max_bytes`` + 1 bytes."""
    source = os.fspath(path) if source is None else source
    if is_remote(path):
        return _read_remote(RemotePath(os.fspath(path)), source, max_bytes)
    try:
        _check_regular(os.stat(path), source, max_bytes)
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb") as f:
            size = os.fstat(fd)
            _check_regular(size, source, max_bytes)
            data = _read_capped(f, size.st_size, max_bytes + 1)
    except FileNotFoundError:
        raise ImageDecodeError(source, "file not found") from None
    except OSError as e:
        raise ImageDecodeError(source, f"cannot read file ({e.strerror or e})") from None
    if len(data) > max_bytes:
        raise ImageDecodeError(source, f"file too large (more than {max_bytes} bytes, the limit)")
    return data


def _read_remote(where: RemotePath, source: str, max_bytes: int) -> bytes:
    try:
        data = read_bytes(where, 0, max_bytes + 1)
    except FileNotFoundError:
        raise ImageDecodeError(source, "file not found") from None
    except (OSError, StorageError) as e:
        raise ImageDecodeError(source, f"cannot read object ({first_line(e, REASON_LIMIT)})") from None
    if len(data) > max_bytes:
        raise ImageDecodeError(source, f"file too large (more than {max_bytes} bytes, the limit)")
    return data


_FILE_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _read_capped(f: io.BufferedReader, expected: int, limit: int) -> bytes:
    # One read of the size stat gave (a read asks for, and allocates, all it may return); a file that grew since
    # is read on in chunks, never past ``limit``
    want = min(expected + 1, limit)
    data = f.read(want)
    if len(data) < want:
        return data
    chunks, total = [data], len(data)
    while total < limit:
        chunk = f.read(min(1 << 20, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _check_regular(st: os.stat_result, source: str, max_bytes: int) -> None:
    if not stat.S_ISREG(st.st_mode):
        kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "a special file")
        raise ImageDecodeError(source, f"not a regular file ({kind}); skipped without reading")
    if st.st_size > max_bytes:
        raise ImageDecodeError(source, f"file too large ({st.st_size} bytes, limit {max_bytes})")


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the ``IMAGE_EXTENSIONS`` (case-insensitive): the one rule that decides which
    files of a folder and which members of a tar shard are images."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def to_rgb(image: Image.Image, options: DecodeOptions = DecodeOptions()) -> Image.Image:
    """Any Pillow mode -> RGB (see the module doc for what happens to alpha, 16 bits and EXIF)."""
    if options.exif_transpose:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = sixteen_to_eight_bits(image)
    if options.composite_alpha and (image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def sixteen_to_eight_bits(image: Image.Image) -> Image.Image:
    """A 16-bit single-channel image as 8-bit L, full range mapped to full range (``round(v / 257)``)."""
    values = np.asarray(image).astype(np.float64)
    return Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8), mode="L")
