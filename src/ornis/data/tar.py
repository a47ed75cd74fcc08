"""Webdataset ``.tar`` shards: which members form a sample, and reading one member's bytes by offset.

The rules, the same for every command that reads a shard:

- A member's key is its path up to the first dot of its last path component, and what follows that dot is its
  field (webdataset's rule): ``dir/c.JPEG`` is key ``dir/c``, field ``jpeg``; ``b.x.png`` is key ``b``, field
  ``x.png``. A member whose name is hidden (starts with a dot, such as macOS's ``._a.jpg``) has no key and is
  left out, as webdataset leaves it out.
- A member is an image when its name ends with one of ``IMAGE_EXTENSIONS`` (``b.x.png`` is one). A sample is a key
  with at least one image; when a key has several (an image and its mask), the first one stored is the sample.
- A ``.cls`` or ``.label`` member holds the sample's integer class label, read only when labels are asked for.
- Samples come in the order their image is stored. Only the headers are read (no image data), so a shard is indexed
  once and its samples read in any order; tars must therefore be uncompressed, as webdataset writes them.
- A shard in object storage (a URL) is read the same way through ranged reads (``ornis.utils.storage.open_input``):
  indexing fetches the headers with what lies between them up to ``SCAN_BLOCK`` ahead, and a sample's bytes are read
  by offset; the shard is never copied whole to local disk.
"""

from __future__ import annotations

import os
import tarfile
from contextlib import nullcontext
from typing import BinaryIO, NamedTuple

from ornis.data.decode import ImageDecodeError, is_image_name
from ornis.data.folders import is_hidden
from ornis.utils.storage import RemotePath, is_remote, open_input

TAR_LABEL_EXTENSIONS = ("cls", "label")
# Bytes fetched ahead while indexing a shard in object storage: webdataset members are small, so one ranged read
# takes many headers at once (a request per header would cost a round trip each); larger members are skipped over.
SCAN_BLOCK = 8 << 20
# Bytes fetched ahead while reading samples: about one batch of photos, so a DataLoader worker reading its batch in
# stored order makes one or two requests and fetches little of the batches the other workers read.
READ_BLOCK = 4 << 20


class TarSample(NamedTuple):
    """One sample of a shard: its key, where its image's bytes are, and its label (``None`` when it has none or
    labels were not read)."""

    key: str
    offset: int  # of the image's data in the tar file
    size: int
    label: int | None = None


def is_tar_name(name: str | os.PathLike) -> bool:
    """Whether a path names a tar shard (``.tar``, case-insensitive)."""
    return os.fspath(name).lower().endswith(".tar")


def split_member_name(name: str) -> tuple[str, str] | None:
    """``(key, field)`` of a member name by webdataset's rule (field lower-cased); ``None`` for a hidden name."""
    folder, _, base = name.rpartition("/")
    if not base or is_hidden(base):
        return None
    stem, _, field = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), field.lower()


class TarIndex(NamedTuple):
    """What a pass over a shard's headers found: its samples, and what is wrong with the shard when it does not end
    as a tar ends (``None`` when it does)."""

    samples: list[TarSample]
    problem: str | None = None


def index_tar_samples(path: str | os.PathLike, read_labels: bool = False) -> list[TarSample]:
    """The samples of an uncompressed webdataset shard, by the rules of the module doc (``scan_tar``'s samples).

    Raises ``OSError`` / ``tarfile.TarError`` for a file that cannot be read as a tar, and ``ValueError`` for a label
    member that does not hold an integer.
    """
    return scan_tar(path, read_labels).samples


def scan_tar(path: str | os.PathLike, read_labels: bool = False) -> TarIndex:
    """``index_tar_samples`` that also says when the shard does not end with a tar's end-of-archive block: Python's
    ``tarfile`` stops without a word at a file cut at a header boundary (or at garbage after a member), so a copy
    cut short would silently lose its last samples."""
    images: dict[str, tuple[int, int]] = {}  # insertion order is stored order
    labels: dict[str, int] = {}
    remote = open_input(RemotePath(os.fspath(path)), SCAN_BLOCK) if is_remote(path) else None
    with remote or nullcontext(), tarfile.open(path if remote is None else None, "r:", fileobj=remote) as tar:
        for member in tar:
            parts = split_member_name(member.name) if member.isfile() else None
            if parts is None:
                continue
            key, field = parts
            if is_image_name(member.name):
                images.setdefault(key, (member.offset_data, member.size))
            elif read_labels and field in TAR_LABEL_EXTENSIONS:
                labels[key] = _read_label(tar, member, path)
        end = tar.offset  # where the header after the last member was looked for
        assert tar.fileobj is not None
        tar.fileobj.seek(end)
        block = tar.fileobj.read(tarfile.BLOCKSIZE)
    samples = [TarSample(key, offset, size, labels.get(key)) for key, (offset, size) in images.items()]
    problem = None
    if len(block) < tarfile.BLOCKSIZE:
        problem = f"truncated tar: it ends at byte {end + len(block)} without the end-of-archive block"
    elif block.count(0) != tarfile.BLOCKSIZE:
        problem = f"unreadable tar header at byte {end}; the members after it are not read"
    if problem is not None:
        problem += f" ({len(samples)} samples before it are used)"
    return TarIndex(samples, problem)


def _read_label(tar: tarfile.TarFile, member: tarfile.TarInfo, path: str | os.PathLike) -> int:
    f = tar.extractfile(member)
    raw = f.read() if f is not None else b""
    try:
        return int(raw.decode().strip())
    except ValueError:  # UnicodeDecodeError is one too
        raise ValueError(f"{os.fspath(path)}: member {member.name} holds {raw[:40]!r}, not an integer label") from None


def read_member(file: BinaryIO, offset: int, size: int, source: str) -> bytes:
    """``size`` bytes at ``offset`` of an open tar file; ``ImageDecodeError`` (named ``source``) when the file ends
    before them."""
    file.seek(offset)
    data = file.read(size)
    if len(data) != size:
        raise ImageDecodeError(source, f"truncated tar member ({len(data)} of {size} bytes)")
    return data


def open_tar(path: str | os.PathLike) -> BinaryIO:
    """A tar shard opened for ``read_member`` (a ranged reader for one in object storage)."""
    return open_input(RemotePath(os.fspath(path)), READ_BLOCK) if is_remote(path) else open(path, "rb")  # noqa: SIM115


def read_tar_member(path: str | os.PathLike, offset: int, size: int, source: str) -> bytes:
    """``read_member`` on the tar file at ``path``, opened for this one read."""
    with open_tar(path) as f:
        return read_member(f, offset, size, source)
