"""What a batch run is asked to do (``BatchJob``), what a worker did (``WorkerStats``) and what the run did
(``BatchSummary``)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import torch

from ornis.data.decode import DecodeOptions
from ornis.errors import OrnisError
from ornis.inference.batch.layout import ERRORS
from ornis.utils.storage import RemotePath, same_place

TASKS = ("embed", "classify")
PRECISIONS = ("auto", "float32", "bfloat16", "float16", "int8")
_DECODE_OPTIONS = ("exif_transpose", "composite_alpha", "max_pixels", "max_bytes")


@dataclass(frozen=True)
class BatchJob:
    """Everything that defines a batch run. The fields in ``IDENTITY`` must match to resume into a folder; the rest
    (device, batch size, workers...) can change between runs."""

    inputs: tuple[str, ...]
    out: str
    model: str
    task: str = "embed"
    top_k: int = 5
    shard_size: int = 1000
    embedding_dtype: str = "float32"
    features: str | None = None
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    network: str | None = None
    precision: str = "auto"  # bf16 autocast on CUDA, float32 on CPU
    batch_size: int | None = None  # 256 on CUDA, 32 on CPU
    num_workers: int | None = None  # from the CPU count
    device: str | None = None  # cuda:<local rank> when there is a GPU
    compile: bool = False
    channels_last: bool | None = None  # on CUDA by default
    # Plain JPEGs decoded in batches on the model's device (nvJPEG on CUDA) and resized there (bicubic, antialiased):
    # for when the CPUs cannot decode as fast as the GPU embeds. Pixels differ from Pillow's by a level or so.
    decode_on_device: bool = False
    retry_errors: bool = False
    progress: bool | None = None  # default: when stderr is a terminal

    IDENTITY: ClassVar[tuple[str, ...]] = (
        "inputs",
        "model",
        "task",
        "top_k",
        "shard_size",
        "embedding_dtype",
        "features",
        "decode",
        "network",
        "decode_on_device",
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.embedding_dtype not in ("float32", "float16"):
            raise ValueError(f"embedding_dtype must be float32 or float16, got {self.embedding_dtype!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        _check_int("top_k", self.top_k, 1)
        _check_int("shard_size", self.shard_size, 1)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, 1)
        if self.num_workers is not None:
            _check_int("num_workers", self.num_workers, 0)
        if self.device is not None:
            check_device_name(self.device)
        if not self.inputs:
            raise ValueError("inputs must name at least one folder, file, pattern, list or tar")

    def identity(self) -> dict[str, Any]:
        """The fields that must match to resume into a folder, as the manifest stores them (JSON types)."""
        d = {k: getattr(self, k) for k in self.IDENTITY}
        d["inputs"] = list(self.inputs)
        d["decode"] = asdict(self.decode)
        return d


def identity_diff(found: dict[str, Any], identity: dict[str, Any]) -> list[str]:
    """What differs between the identity a folder's manifest holds and this job's, one line each (``[]``: the same
    job). Inputs are compared as the files they name (``./data/`` and ``data`` are one folder); decoding options
    a manifest predates count as their defaults."""
    diff = []
    for k, v in identity.items():
        have = found.get(k)
        if k == "inputs":
            have, v = _resolved(have or []), _resolved(v)
        elif k == "decode" and isinstance(have, dict):
            have = {**asdict(DecodeOptions()), **have}
        if have != v:
            diff.append(f"{k}: folder has {found.get(k)!r}, this run {identity[k]!r}")
    return diff


def _resolved(inputs: Sequence[str]) -> list[str]:
    return [same_place(i) for i in inputs]


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer of at least {minimum}, got {value!r}")


def check_device_name(device: str) -> str:
    """``device`` if torch can parse it as a device (``cpu``, ``cuda``, ``cuda:1``, ``mps``...); ``ValueError`` naming
    the argument otherwise. Whether that device exists here is checked when the run starts."""
    try:
        torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N (or another torch device), got {device!r}") from None
    return device


def check_device_available(device: str | None) -> None:
    """``OrnisError`` when ``device`` names a GPU this machine does not have (``None``: the default, always fine)."""
    if device is None:
        return
    d = torch.device(check_device_name(device))
    if d.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise OrnisError(f"device {device!r}: no CUDA GPU is available here; use --device cpu")
        if d.index is not None and d.index >= count:
            raise OrnisError(f"device {device!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif d.type == "mps" and not torch.backends.mps.is_available():
        raise OrnisError(f"device {device!r}: MPS is not available here; use --device cpu")
    elif d.type not in ("cpu", "cuda", "mps"):
        raise OrnisError(f"device {device!r}: the batch runner runs on cpu, cuda or mps")


def make_job(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    model: str | os.PathLike,
    out: str | os.PathLike,
    **options: Any,
) -> BatchJob:
    """A ``BatchJob`` from loose arguments: one input or many, paths or strings, and the decoding options
    (``exif_transpose``, ``composite_alpha``, ``max_pixels``, ``max_bytes``) given flat or as
    ``decode=DecodeOptions(...)``."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    decode = options.pop("decode", None)
    flat = {k: options.pop(k) for k in _DECODE_OPTIONS if k in options}
    if decode is None:
        decode = DecodeOptions(**{k: v for k, v in flat.items() if v is not None})  # None: the default
    return BatchJob(
        inputs=tuple(os.fspath(i) for i in inputs), out=os.fspath(out), model=os.fspath(model), decode=decode, **options
    )


_COUNTS = ("images", "errors", "shards")
_SUMMED = (*_COUNTS, "decode_s", "wait_s", "model_s")
_LONGEST = ("wall_s", "loop_s")


@dataclass
class WorkerStats:
    """One worker's counts and timings; ``add`` combines workers (sums, and the longest of the wall times)."""

    images: int = 0
    errors: int = 0
    shards: int = 0
    decode_s: float = 0.0  # CPU seconds decoding and resizing, summed over DataLoader workers
    wait_s: float = 0.0  # seconds the model loop waited for decoded batches
    model_s: float = 0.0  # seconds the model loop spent on the device (copies, forward, results)
    loop_s: float = 0.0  # from the first decoded batch to the end: the steady pipeline, without start-up
    wall_s: float = 0.0

    SUMMED: ClassVar[tuple[str, ...]] = _SUMMED
    LONGEST: ClassVar[tuple[str, ...]] = _LONGEST

    def add(self, other: WorkerStats) -> None:
        """Add ``other``'s counts and times to these; wall and loop times are the longer of the two."""
        for k in _SUMMED:
            setattr(self, k, getattr(self, k) + getattr(other, k))
        for k in _LONGEST:
            setattr(self, k, max(getattr(self, k), getattr(other, k)))

    @classmethod
    def from_values(cls, summed: Sequence[float], longest: Sequence[float]) -> WorkerStats:
        """Stats from the values of ``SUMMED`` and ``LONGEST`` in order (as collectives return them)."""
        values = {k: (int(v) if k in _COUNTS else float(v)) for k, v in zip(_SUMMED, summed)}
        values.update({k: float(v) for k, v in zip(_LONGEST, longest)})
        return cls(**values)

    def values(self, names: Sequence[str]) -> list[float]:
        """The values of ``names`` as floats, for a collective."""
        return [float(getattr(self, k)) for k in names]


@dataclass
class BatchSummary:
    """What a run did. ``done`` images embedded / classified now, ``skipped`` already done before (resume)."""

    out: Path | RemotePath  # the output folder (a URL's RemotePath in object storage)
    done: int
    skipped: int
    errors: int
    shards_done: int
    shards_total: int
    wall_s: float
    decode_s: float
    wait_s: float
    model_s: float
    loop_s: float = 0.0
    world_size: int = 1
    error_records: int = 0  # lines in the errors file, all runs together

    @property
    def images_per_s(self) -> float:
        """Images done now per second of wall time, start-up included."""
        return self.done / self.wall_s if self.wall_s > 0 else 0.0

    def __str__(self) -> str:
        return (
            f"{self.done} images done, {self.skipped} skipped (already done), {self.errors} errors "
            f"({self.error_records} listed in {self.out / ERRORS}); {self.shards_done}/{self.shards_total} shards; "
            f"{self.images_per_s:.1f} images/s over {self.wall_s:.1f} s on {self.world_size} process(es); "
            f"decoding {self.decode_s:.1f} CPU-s in workers, waiting for data {self.wait_s:.1f} s, "
            f"model {self.model_s:.1f} s"
        )


assert {f.name for f in fields(WorkerStats)} == {*_SUMMED, *_LONGEST}  # every field is combined one way or the other
