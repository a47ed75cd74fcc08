"""Training data: a source of images (a folder or webdataset tar shards) paired with a seeded augmentation.

A ``SampleDataset`` pairs a source (:mod:`ornis.data.sources`, which reads folders and shards by the same rules as
``ornis embed``) with a transform, and is what ``ornis.train.loop.run`` takes: it is indexed by
``SampleKey(index, seed)`` and runs the transform under that seed, so an augmented sample is a pure function of the
key (exact resume, the same crops whatever the number of ranks or loader workers). The sources and augmentations
are re-exported from here, where the recipes import them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from ornis.data.augment import MixupCutmix, eval_transform, seeded, train_transform
from ornis.data.decode import ImageDecodeError
from ornis.data.keys import SampleKey
from ornis.data.sources import (
    DatasetError,
    FileSample,
    ImageFolderSource,
    Source,
    TarMember,
    TarShardSource,
    open_source,
)
from ornis.data.tar import TAR_LABEL_EXTENSIONS

__all__ = [
    "TAR_LABEL_EXTENSIONS",
    "DatasetError",
    "FileSample",
    "ImageFolderSource",
    "MixupCutmix",
    "SampleDataset",
    "SampleKey",
    "Source",
    "TarMember",
    "TarShardSource",
    "eval_transform",
    "open_source",
    "seeded",
    "train_transform",
]

log = logging.getLogger("ornis.train")


class SampleDataset(Dataset):
    """``source`` + ``transform``, indexed by ``SampleKey`` (or a plain index: seed 0). Returns
    ``(transform(image), label)``. An image that cannot be decoded is logged and replaced by the next readable one,
    so one bad file does not stop a long run."""

    def __init__(self, source: Source, transform: Callable[[Image.Image], Any]) -> None:
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
