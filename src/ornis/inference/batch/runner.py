"""The model on its device: a batch of decoded pixels in, the rows' arrays out."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ornis.data.transforms import classification_transform
from ornis.errors import OrnisError
from ornis.inference.batch.device_decode import decode_batch_jpegs
from ornis.inference.batch.job import BatchJob
from ornis.inference.batch.records import Batch, Outputs
from ornis.inference.preprocess import describe_preprocessing, normalize_on_device, split_transform
from ornis.loading import ModelInfo
from ornis.models.precision import prepare_for_inference
from ornis.weights.checkpoint import get_size_from_signature


class StepResult(NamedTuple):
    """What one forward pass gives, on the device (a NamedTuple so that ``torch.compile`` traces it)."""

    embedding: torch.Tensor
    probabilities: torch.Tensor | None
    features: torch.Tensor | None


class ModelRunner:
    """A batch of worker output (uint8 or float pixels) -> the rows' ``Outputs``, on the model's device: the
    checkpoint's preprocessing split between the DataLoader workers (``cpu_transform``) and the device, autocast at
    the job's precision, optionally channels-last and compiled."""

    def __init__(self, net: torch.nn.Module, info: ModelInfo, job: BatchJob, device: torch.device) -> None:
        _check_model(net, job)
        self.net = net
        self.job = job
        self.device = device
        self.size = get_size_from_signature(info.signature)
        self.transform = classification_transform(self.size, info.rgb_stats)
        self.cpu_transform, self.norm = split_transform(self.transform)
        if job.decode_on_device and self.norm is None:
            raise OrnisError("decode_on_device needs the standard classification_transform")
        self.preprocessing = describe_preprocessing(self.size, info.rgb_stats, job.decode, job.decode_on_device)
        self.idx_to_class = {v: k for k, v in info.class_to_idx.items()}
        self.precision = job.precision
        if self.precision == "auto":
            self.precision = "bfloat16" if device.type == "cuda" else "float32"
        if self.precision == "int8" or (self.precision == "bfloat16" and device.type == "cpu"):
            # the CPU fast path: int8 linear layers, or bf16 weights under autocast (ornis.models.precision)
            net = self.net = prepare_for_inference(net, "int8" if self.precision == "int8" else "bf16", inplace=True)
        self.autocast = self.precision not in ("float32", "int8")
        self.channels_last = device.type == "cuda" if job.channels_last is None else job.channels_last
        if self.channels_last:
            net.to(memory_format=torch.channels_last)
        self.step: Callable[[torch.Tensor], StepResult] = torch.compile(self._step) if job.compile else self._step
        self.max_batch = 0

    def _step(self, x: torch.Tensor) -> StepResult:
        emb = self.net.embedding(x)
        probs = F.softmax(self.net.classify(emb).float(), dim=1) if self.job.task == "classify" else None
        feats = self.net.detection_features(x)[self.job.features] if self.job.features else None
        return StepResult(emb, probs, feats)

    def decode_jpegs(self, batch: Batch) -> tuple[torch.Tensor | None, Batch]:
        """The batch's pixels on the device, its JPEGs decoded and resized here (see ``decode_batch_jpegs``)."""
        return decode_batch_jpegs(batch, self.device, self.size)

    def launch(self, pixels: torch.Tensor) -> Callable[[], Outputs]:
        """Start the batch on the device and return a function that waits for its rows. On CUDA the results come
        back through non-blocking copies, so the loop can hand the next batch to the GPU before reading these."""
        n = pixels.shape[0]
        x = pixels.to(self.device, non_blocking=True)
        if self.norm is not None:
            x = normalize_on_device(x, self.norm)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if self.job.compile and n < self.max_batch:
            # Pad the short last batch of a shard to the usual size so the compiled graph is reused
            x = torch.cat([x, x[-1:].expand(self.max_batch - n, *x.shape[1:])])
        self.max_batch = max(self.max_batch, n)
        dtype = torch.bfloat16 if self.precision == "int8" else getattr(torch, self.precision)
        with torch.inference_mode(), torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast):
            res = self.step(x)
            outputs: dict[str, torch.Tensor] = {}
            if self.job.task == "embed":
                outputs["embedding"] = res.embedding[:n].float()
            else:
                assert res.probabilities is not None
                k = min(self.job.top_k, res.probabilities.shape[1])
                outputs["probabilities"], outputs["label_ids"] = res.probabilities[:n].topk(k, dim=1)
            if res.features is not None:
                outputs["features"] = res.features[:n].float()
            on_host = {k: v.to("cpu", non_blocking=True) for k, v in outputs.items()}
        done = torch.cuda.Event() if self.device.type == "cuda" else None
        if done is not None:
            done.record()

        def wait() -> Outputs:
            if done is not None:
                done.synchronize()
            return Outputs(**{k: v.numpy() for k, v in on_host.items()})

        return wait

    def __call__(self, pixels: torch.Tensor) -> Outputs:
        """Run one batch and wait for its rows: ``launch(pixels)()``."""
        return self.launch(pixels)()


def _check_model(net: torch.nn.Module, job: BatchJob) -> None:
    stages = list(getattr(net, "return_stages", []))
    if job.features and job.features not in stages:
        raise OrnisError(f"{job.model}: no feature map {job.features!r}; this model has {', '.join(stages) or 'none'}")
    if job.task == "classify" and getattr(net, "num_classes", 0) < 1:
        raise OrnisError(f"{job.model}: the model has no classification head (num_classes=0); use embed")
