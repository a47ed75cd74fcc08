"""Sources of training and evaluation images: a folder or webdataset tar shards, listed once and read by index.

A *source* lists samples and reads one: ``len(source)``, ``source.name(i)``, ``source.read(i) -> (PIL RGB image,
label)`` and ``source.class_to_idx``. Labels are -1 where there are none (the user's own unlabelled folder). Which
files of a folder and which members of a tar are samples is decided by :mod:`ornis.data.folders` and
:mod:`ornis.data.tar`, the rules ``ornis embed`` plans with, so every command sees the same samples.
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple, Protocol

from PIL import Image

from ornis.data.decode import IMAGE_EXTENSIONS, decode_image
from ornis.data.folders import is_hidden, is_image_name, sub_folders, walk_images
from ornis.data.tar import index_tar_samples, is_tar_name, read_tar_member
from ornis.errors import OrnisError


class DatasetError(OrnisError):
    """A training data location that cannot be used (missing, empty, mixed layout)."""


class Source(Protocol):
    """What ``SampleDataset`` reads from (see the module doc)."""

    class_to_idx: dict[str, int]

    def __len__(self) -> int: ...

    def name(self, i: int) -> str:
        """A name for sample ``i`` in messages and outputs (its path, or ``<shard>:<key>`` in a tar)."""

    def read(self, i: int) -> tuple[Image.Image, int]:
        """Sample ``i`` decoded to an RGB PIL image, and its label (-1 when unlabelled)."""


class FileSample(NamedTuple):
    """An image file and its label (-1: none)."""

    path: Path
    label: int


class ImageFolderSource:
    """Images under a folder.

    ``labelled=True``: the ImageFolder layout, ``root/<class name>/**/<image>``; classes are the sorted sub-folder
    names unless ``class_to_idx`` is given (a validation folder must use the training mapping). ``labelled=False``:
    every image anywhere under ``root``, any layout, label -1 — the user's own unlabelled photos.
    """

    def __init__(
        self, root: str | os.PathLike, labelled: bool = True, class_to_idx: dict[str, int] | None = None
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a folder")
        if labelled:
            classes = sub_folders(self.root)
            if class_to_idx is None:
                class_to_idx = {c: i for i, c in enumerate(classes)}
            unknown = [c for c in classes if c not in class_to_idx]
            if unknown:
                raise DatasetError(
                    f"{self.root}: class folders {unknown[:5]} are not among the expected classes "
                    f"{sorted(class_to_idx)[:10]}"
                )
            self.samples = [FileSample(Path(p), class_to_idx[c]) for c in classes for p in walk_images(self.root / c)]
        else:
            class_to_idx = class_to_idx or {}
            self.samples = [FileSample(Path(p), -1) for p in walk_images(self.root)]
        if not self.samples:
            layout = "<class>/<image> sub-folders" if labelled else "images"
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS)[:8])
            raise DatasetError(f"{self.root}: no {layout} found (extensions: {extensions}, ...)")
        self.class_to_idx = dict(class_to_idx)

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, i: int) -> str:
        """The path of sample ``i``."""
        return str(self.samples[i].path)

    def read(self, i: int) -> tuple[Image.Image, int]:
        """Sample ``i`` decoded to RGB, and its label."""
        path, label = self.samples[i]
        return decode_image(path).image, label


class TarMember(NamedTuple):
    """One sample of a tar shard: which shard, its key, where its image's bytes are, and its label (-1: none)."""

    shard: Path
    key: str
    offset: int
    size: int
    label: int


class TarShardSource:
    """Webdataset tar shards (sorted by path): the samples :mod:`ornis.data.tar` finds, with an integer label from
    the sample's ``.cls`` member when ``labelled``.

    The shards are indexed once (a pass over the tar headers, no image data read) so samples can be read in any
    order: the loop's deterministic order and exact resume work as for folders.
    """

    def __init__(self, shards: Sequence[str | os.PathLike], labelled: bool = True) -> None:
        self.members: list[TarMember] = []
        for shard in sorted(Path(s) for s in shards):
            self.members.extend(self._index(shard, labelled))
        if not self.members:
            raise DatasetError(f"no images found in the tar shards {[str(s) for s in shards][:5]}")
        labels = sorted({m.label for m in self.members if m.label >= 0})
        self.class_to_idx = {str(c): c for c in labels}

    @staticmethod
    def _index(shard: Path, labelled: bool) -> list[TarMember]:
        try:
            samples = index_tar_samples(shard, read_labels=labelled)
        except (tarfile.TarError, OSError, ValueError) as e:
            raise DatasetError(f"{shard}: cannot be read as a tar shard ({e})") from None
        if labelled and samples and all(s.label is None for s in samples):
            raise DatasetError(f"{shard}: no .cls labels; pass labelled=False for unlabelled shards")
        return [TarMember(shard, s.key, s.offset, s.size, -1 if s.label is None else s.label) for s in samples]

    def __len__(self) -> int:
        return len(self.members)

    def name(self, i: int) -> str:
        """``<shard path>:<key>`` of sample ``i``."""
        m = self.members[i]
        return f"{m.shard}:{m.key}"

    def read(self, i: int) -> tuple[Image.Image, int]:
        """Sample ``i`` decoded to RGB, and its label."""
        m = self.members[i]
        data = read_tar_member(m.shard, m.offset, m.size, self.name(i))
        return decode_image(data, source=self.name(i)).image, m.label


def open_source(
    location: str | os.PathLike | Sequence[str | os.PathLike],
    labelled: bool,
    class_to_idx: dict[str, int] | None = None,
) -> ImageFolderSource | TarShardSource:
    """A folder, a ``.tar`` shard, a folder of shards (and no images beside them), or a list of shards."""
    if isinstance(location, (list, tuple)):
        return TarShardSource(location, labelled)
    path = Path(location)
    if path.is_file() and is_tar_name(path):
        return TarShardSource([path], labelled)
    if path.is_dir():
        visible = sorted(p for p in path.iterdir() if not is_hidden(p.name))
        shards = [p for p in visible if p.is_file() and is_tar_name(p.name)]
        if shards and not any(is_image_name(p.name) for p in visible):
            return TarShardSource(shards, labelled)
        return ImageFolderSource(path, labelled, class_to_idx)
    raise DatasetError(f"{path}: no such folder or tar shard")
