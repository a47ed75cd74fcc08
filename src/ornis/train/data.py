"""Training data: where the images are (folders, webdataset tar shards) and how they are augmented.

A *source* lists samples and reads one: ``len(source)``, ``source.read(i) -> (PIL RGB image, label)``, and
``source.class_to_idx``. Labels are -1 where there are none (the user's own unlabelled folder). A
``SampleDataset`` pairs a source with a transform and is what ``ornis.train.loop.run`` takes: it is indexed by
``SampleKey(index, seed)`` and runs the transform under that seed, so an augmented sample is a pure function of the
key (exact resume, the same crops whatever the number of ranks or loader workers).
"""

from __future__ import annotations

import logging
import os
import random
import tarfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import v2

from ornis.data.decode import IMAGE_EXTENSIONS, ImageDecodeError, decode_image
from ornis.data.transforms import classification_transform
from ornis.errors import OrnisError
from ornis.train.loop import SampleKey

log = logging.getLogger("ornis.train")

TAR_IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TAR_LABEL_EXTENSIONS = ("cls", "label")


class DatasetError(OrnisError):
    """A training data location that cannot be used (missing, empty, mixed layout)."""


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


class ImageFolderSource:
    """Images under a folder.

    ``labelled=True``: the ImageFolder layout, ``root/<class name>/**/<image>``; classes are the sorted sub-folder
    names unless ``class_to_idx`` is given (a validation folder must use the training mapping). ``labelled=False``:
    every image anywhere under ``root``, any layout, label -1 — the user's own unlabelled photos.
    """

    def __init__(self, root: str | os.PathLike, labelled: bool = True, class_to_idx: dict[str, int] | None = None) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"{self.root}: not a folder")
        if labelled:
            classes = sorted(p.name for p in self.root.iterdir() if p.is_dir() and not p.name.startswith("."))
            if class_to_idx is None:
                class_to_idx = {c: i for i, c in enumerate(classes)}
            unknown = [c for c in classes if c not in class_to_idx]
            if unknown:
                raise DatasetError(f"{self.root}: class folders {unknown[:5]} are not among the expected classes "
                                   f"{sorted(class_to_idx)[:10]}")
            self.samples = [(p, class_to_idx[c]) for c in classes for p in sorted((self.root / c).rglob("*")) if _is_image(p)]
        else:
            class_to_idx = class_to_idx or {}
            self.samples = [(p, -1) for p in sorted(self.root.rglob("*")) if _is_image(p)]
        if not self.samples:
            layout = "<class>/<image> sub-folders" if labelled else "images"
            raise DatasetError(f"{self.root}: no {layout} found (extensions: {', '.join(sorted(IMAGE_EXTENSIONS)[:8])}, ...)")
        self.class_to_idx = dict(class_to_idx)

    def __len__(self) -> int:
        return len(self.samples)

    def name(self, i: int) -> str:
        return str(self.samples[i][0])

    def read(self, i: int) -> tuple[Image.Image, int]:
        path, label = self.samples[i]
        return decode_image(path).image, label


@dataclass(frozen=True)
class _TarMember:
    shard: Path
    offset: int  # of the image bytes in the tar file
    size: int
    key: str
    label: int


class TarShardSource:
    """Webdataset tar shards: members grouped by key (the member path up to the first dot of its file name), one
    image (``.jpg``, ``.jpeg``, ``.png``, ``.webp``) per key and optionally an integer label (``.cls``).

    The shards are indexed once (a pass over the tar headers, no image data read) so samples can be read in any
    order: the loop's deterministic order and exact resume work as for folders.
    """

    def __init__(self, shards: Sequence[str | os.PathLike], labelled: bool = True) -> None:
        self.members: list[_TarMember] = []
        for shard in sorted(Path(s) for s in shards):
            self.members.extend(self._index(shard, labelled))
        if not self.members:
            raise DatasetError(f"no images found in the tar shards {[str(s) for s in shards][:5]}")
        labels = sorted({m.label for m in self.members if m.label >= 0})
        self.class_to_idx = {str(c): c for c in labels}

    @staticmethod
    def _index(shard: Path, labelled: bool) -> list[_TarMember]:
        images: dict[str, tuple[int, int]] = {}
        labels: dict[str, int] = {}
        order: list[str] = []
        try:
            with tarfile.open(shard, "r:") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, _, fname = info.name.rpartition("/")
                    stem, _, ext = fname.partition(".")
                    key = f"{folder}/{stem}" if folder else stem
                    ext = ext.lower()
                    if ext in TAR_IMAGE_EXTENSIONS:
                        if key not in images:
                            order.append(key)
                        images[key] = (info.offset_data, info.size)
                    elif labelled and ext in TAR_LABEL_EXTENSIONS:
                        f = tar.extractfile(info)
                        labels[key] = int(f.read().decode().strip()) if f is not None else -1
        except (tarfile.TarError, OSError) as e:
            raise DatasetError(f"{shard}: cannot be read as a tar shard ({e})") from None
        if labelled and images and not labels:
            raise DatasetError(f"{shard}: no .cls labels; pass labelled=False for unlabelled shards")
        return [_TarMember(shard, *images[k], key=k, label=labels.get(k, -1)) for k in order]

    def __len__(self) -> int:
        return len(self.members)

    def name(self, i: int) -> str:
        m = self.members[i]
        return f"{m.shard}:{m.key}"

    def read(self, i: int) -> tuple[Image.Image, int]:
        m = self.members[i]
        with open(m.shard, "rb") as f:
            f.seek(m.offset)
            data = f.read(m.size)
        return decode_image(data, source=self.name(i)).image, m.label


def open_source(location: str | os.PathLike | Sequence[str | os.PathLike], labelled: bool,
                class_to_idx: dict[str, int] | None = None) -> ImageFolderSource | TarShardSource:
    """A folder, a ``.tar`` shard, a folder of shards, or a list of shards."""
    if isinstance(location, (list, tuple)):
        return TarShardSource(location, labelled)
    path = Path(location)
    if path.is_file() and path.suffix == ".tar":
        return TarShardSource([path], labelled)
    if path.is_dir():
        shards = sorted(path.glob("*.tar"))
        if shards and not any(_is_image(p) for p in path.iterdir()):
            return TarShardSource(shards, labelled)
        return ImageFolderSource(path, labelled, class_to_idx)
    raise DatasetError(f"{path}: no such folder or tar shard")


class SampleDataset(Dataset):
    """``source`` + ``transform``, indexed by ``SampleKey`` (or a plain index: seed 0). Returns
    ``(transform(image), label)``. An image that cannot be decoded is logged and replaced by the next readable one,
    so one bad file does not stop a long run."""

    def __init__(self, source: Any, transform: Callable[[Image.Image], Any]) -> None:
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: SampleKey | int) -> tuple[Any, int]:
        index, seed = (key.index, key.seed) if isinstance(key, SampleKey) else (int(key), 0)
        for attempt in range(len(self.source)):
            i = (index + attempt) % len(self.source)
            try:
                image, label = self.source.read(i)
                break
            except ImageDecodeError as e:
                log.warning("skipping unreadable training image: %s", e)
        else:
            raise DatasetError("no readable image in the training data")
        with seeded(seed):
            return self.transform(image), label


class seeded:
    """Run a block with torch's, Python's and NumPy's global RNGs seeded, restoring them afterwards (torchvision's
    random transforms draw from the global generators)."""

    def __init__(self, seed: int) -> None:
        self.seed = int(seed)

    def __enter__(self) -> None:
        self._states = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        torch.manual_seed(self.seed)
        random.seed(self.seed)
        np.random.seed(self.seed % 2**32)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self._states[0])
        random.setstate(self._states[1])
        np.random.set_state(self._states[2])


# -- augmentation ----------------------------------------------------------------------------------------------------
def train_transform(
    size: int | Sequence[int],
    rgb_stats: dict[str, Any],
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    hflip: bool = True,
    auto_augment: str | None = None,
    randaugment_magnitude: int = 9,
) -> Callable[[Image.Image], torch.Tensor]:
    """Random resized crop, horizontal flip, optionally RandAugment (``"randaugment"``) or TrivialAugment
    (``"trivialaugment"``), then [0, 1] scaling and normalisation with ``rgb_stats``."""
    h, w = (size, size) if isinstance(size, int) else size
    steps: list[Any] = [v2.PILToTensor(), v2.RandomResizedCrop((h, w), scale=scale, antialias=True)]
    if hflip:
        steps.append(v2.RandomHorizontalFlip())
    if auto_augment == "randaugment":
        steps.append(v2.RandAugment(magnitude=randaugment_magnitude))
    elif auto_augment == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    elif auto_augment not in (None, "none"):
        raise ValueError(f"auto_augment must be 'randaugment', 'trivialaugment' or None, got {auto_augment!r}")
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(rgb_stats["mean"]), list(rgb_stats["std"]))]
    return v2.Compose(steps)


def eval_transform(size: int | Sequence[int], rgb_stats: dict[str, Any], center_crop: float = 1.0) -> Callable:
    """The inference preprocessing (``ornis.classification_transform``), for validation."""
    return classification_transform(size, rgb_stats, center_crop=center_crop)


class MixupCutmix:
    """Batch-level mixup / cutmix (torchvision v2, one of them per batch when both are on) with label smoothing:
    ``(images, labels) -> (images, soft targets)``; randomness from the global torch RNG (the loop seeds it)."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, label_smoothing: float = 0.0) -> None:
        self.num_classes = num_classes
        self.label_smoothing = label_smoothing
        ops = []
        if mixup_alpha > 0:
            ops.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            ops.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.op = None if not ops else ops[0] if len(ops) == 1 else v2.RandomChoice(ops)

    @property
    def active(self) -> bool:
        return self.op is not None

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.op is not None:
            images, targets = self.op(images, labels)
        else:
            targets = F.one_hot(labels, self.num_classes).to(images.dtype)
        if self.label_smoothing:
            targets = targets * (1.0 - self.label_smoothing) + self.label_smoothing / self.num_classes
        return images, targets
