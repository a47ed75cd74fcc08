"""The batch runner's dataset: one sample of one planned shard, decoded (or left as JPEG bytes), never raised.

Inputs are read by the one input layer every command shares: :mod:`ornis.data.inputs` (folders, images, glob
patterns, file lists), :mod:`ornis.data.tar` (webdataset shards: key = the member path up to the first dot of its
file name, the first image member of each key is the sample) and :mod:`ornis.data.folders` (one image-extension set,
hidden names left out); :mod:`ornis.data.plan` turns them into shards. The names the batch runner imports from
here (``plan_shards``, ``write_plan``, ...) are re-exported.
"""

from __future__ import annotations

import io
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch
from PIL import Image
from torch.utils.data import Dataset

from ornis.data.decode import DecodeOptions, ImageDecodeError, decode_image, is_image_name, read_image_bytes
from ornis.data.inputs import LIST_SUFFIXES, PATH_COLUMNS, InputError, read_file_list
from ornis.data.plan import PLAN_SCHEMA, InputProblem, Item, Shard, index_tar, plan_shards, read_plan_shard, write_plan
from ornis.data.tar import open_tar, read_member
from ornis.utils.storage import Location, RemotePath, is_remote, location, read_many

__all__ = [
    "LIST_SUFFIXES",
    "PATH_COLUMNS",
    "PLAN_SCHEMA",
    "InputError",
    "InputProblem",
    "Item",
    "Sample",
    "Shard",
    "ShardDataset",
    "collate_samples",
    "index_tar",
    "is_image_name",
    "plan_shards",
    "read_file_list",
    "read_plan_shard",
    "write_plan",
]

_CACHED_SHARDS = 4  # plan shards kept in memory by a worker (it reads its shard's rows once, not once a sample)


@dataclass
class Sample:
    """What ``ShardDataset`` returns for one sample: decoded ``pixels`` (the transform's output) or the ``jpeg``
    bytes left for the device, the decoded size, or ``ok=False`` and the ``reason`` it could not be used."""

    shard: int
    index: int
    key: str
    ok: bool = False
    pixels: torch.Tensor | None = None
    jpeg: torch.Tensor | None = None
    width: int = 0
    height: int = 0
    reason: str = ""
    decode_s: float = 0.0


class ShardDataset(Dataset):
    """``dataset[(shard, index)]`` decodes one sample and returns a ``Sample``; a bad sample is returned with
    ``ok=False`` and its ``reason``, never raised, so one file cannot end a DataLoader worker or the run.

    ``transform`` runs on the decoded RGB PIL image in the worker (the CPU part of the preprocessing). With
    ``raw_jpeg=True`` a plain (RGB or grayscale) JPEG is not decoded here: its bytes come back as ``jpeg`` (a uint8
    tensor) for batched decoding on the model's device; its header is still checked here (size, bomb limit).
    """

    def __init__(
        self,
        plan_path: Path | RemotePath | str,
        transform: Callable[[Any], torch.Tensor],
        options: DecodeOptions | None = None,
        raw_jpeg: bool = False,
    ) -> None:
        self.plan_path: Location = location(plan_path)
        self.transform = transform
        self.options = options or DecodeOptions()
        self.raw_jpeg = raw_jpeg
        self._shards: OrderedDict[int, list[Item]] = OrderedDict()
        self._tar: tuple[str, BinaryIO] | None = None

    def items(self, shard_id: int) -> list[Item]:
        """The planned samples of one shard."""
        if shard_id not in self._shards:
            self._shards[shard_id] = read_plan_shard(self.plan_path, shard_id)
            while len(self._shards) > _CACHED_SHARDS:
                self._shards.popitem(last=False)
        return self._shards[shard_id]

    def __getitem__(self, index: tuple[int, int]) -> Sample:
        return self._sample(index)

    def __getitems__(self, indices: list[tuple[int, int]]) -> list[Sample]:
        """A batch of samples (the DataLoader's batched fetch): objects in object storage are fetched together, so
        a batch waits for about one round trip instead of one per image."""
        remote = [
            (index, item)
            for index in indices
            if (item := self.items(index[0])[index[1]]).offset < 0 and is_remote(item.path)
        ]
        if len(remote) < 2:
            return [self._sample(index) for index in indices]
        start = time.perf_counter()
        fetched = read_many([item.path for _, item in remote], self.options.max_bytes + 1)
        # An object that came back whole and within the limit is decoded from these bytes; any other is read again
        # on its own, which names what is wrong with it exactly as a one-by-one read would
        ready = {
            index: data
            for (index, _), data in zip(remote, fetched)
            if data is not None and len(data) <= self.options.max_bytes
        }
        share = (time.perf_counter() - start) / len(remote)
        return [self._sample(index, ready.get(index), share if index in ready else 0.0) for index in indices]

    def _sample(self, index: tuple[int, int], fetched: bytes | None = None, fetch_s: float = 0.0) -> Sample:
        shard_id, i = index
        item = self.items(shard_id)[i]
        start = time.perf_counter() - fetch_s
        sample = Sample(shard_id, i, item.key)
        try:
            if fetched is not None:
                data: bytes | str = fetched
            else:
                data = self._read_tar_member(item) if item.offset >= 0 else item.path
            if self.raw_jpeg:
                data = data if isinstance(data, bytes) else read_image_bytes(data, item.key, self.options.max_bytes)
                size = self._plain_jpeg_size(data)
                if size is not None:
                    jpeg = torch.frombuffer(bytearray(data), dtype=torch.uint8)
                    sample.ok, sample.jpeg, (sample.width, sample.height) = True, jpeg, size
                    sample.decode_s = time.perf_counter() - start
                    return sample
            decoded = decode_image(data, self.options, source=item.key)
            pixels = self.transform(decoded.image)
        except ImageDecodeError as e:
            sample.reason = e.reason
        except Exception as e:  # noqa: BLE001 - a transform failing on one odd image must not end the run either
            sample.reason = f"preprocessing failed ({type(e).__name__}: {e})"
        else:
            sample.ok, sample.pixels, sample.width, sample.height = True, pixels, decoded.width, decoded.height
        sample.decode_s = time.perf_counter() - start
        return sample

    def _plain_jpeg_size(self, data: bytes) -> tuple[int, int] | None:
        """(width, height) of a JPEG the device decoder gives the same colours for (RGB or L, within the pixel
        limit, no EXIF transposition asked for); ``None`` sends the file down the CPU path."""
        if not data.startswith(b"\xff\xd8\xff") or self.options.exif_transpose:
            return None
        try:
            with Image.open(io.BytesIO(data)) as image:  # the header only
                if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                    return None
                width, height = image.size
        except Exception:  # noqa: BLE001 - whatever it is, the CPU path will name it
            return None
        return (width, height) if width * height <= self.options.max_pixels else None

    def _read_tar_member(self, item: Item) -> bytes:
        if item.size > self.options.max_bytes:
            raise ImageDecodeError(item.key, f"file too large ({item.size} bytes, limit {self.options.max_bytes})")
        if self._tar is None or self._tar[0] != item.path:
            if self._tar is not None:
                self._tar[1].close()
            self._tar = (item.path, open_tar(item.path))  # kept open across samples, closed on switch
        return read_member(self._tar[1], item.offset, item.size, item.key)

    def __getstate__(self) -> dict[str, Any]:  # open files and caches stay in the process that made them
        return {**self.__dict__, "_shards": OrderedDict(), "_tar": None}

    def __len__(self) -> int:
        raise TypeError("ShardDataset is indexed by (shard, index) pairs from a sampler; it has no length")


def collate_samples(samples: list[Sample]) -> dict[str, Any]:
    """A batch: the good samples' pixels stacked, their keys and sizes, and the bad ones as error records
    ``(shard, index, key, reason)``. Samples left as JPEG bytes (``raw_jpeg``) come after the decoded ones, their
    bytes in ``jpeg``."""
    decoded = [s for s in samples if s.ok and s.pixels is not None]
    raw = [s for s in samples if s.ok and s.jpeg is not None]
    good = decoded + raw
    return {
        "pixels": torch.stack([s.pixels for s in decoded]) if decoded else None,
        "jpeg": [s.jpeg for s in raw],
        "shard": [s.shard for s in good],
        "index": [s.index for s in good],
        "key": [s.key for s in good],
        "width": [s.width for s in good],
        "height": [s.height for s in good],
        "errors": [(s.shard, s.index, s.key, s.reason) for s in samples if not s.ok],
        "decode_s": sum(s.decode_s for s in samples),
        "count": len(samples),
    }
