"""The job's checkpoint, resolved to a file and hashed once per job (rank 0 or the Ray driver), then loaded by every
worker from that file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ornis.errors import OrnisError
from ornis.inference.batch.job import BatchJob
from ornis.inference.batch.manifest import Manifest
from ornis.loading import ModelInfo, load_pretrained_model, model_file, resolve_model_name
from ornis.models.base import Encoder
from ornis.weights.checkpoint import sha256_file


@dataclass(frozen=True)
class ResolvedModel:
    """The checkpoint file a job runs, its sha256, and its architecture when the job or the published weights
    name it (else the file says it)."""

    path: Path
    sha256: str
    network: str | None = None

    @classmethod
    def from_manifest(cls, manifest: Manifest, job: BatchJob) -> ResolvedModel:
        """What ``prepare_output`` resolved, as the folder's manifest records it."""
        return cls(Path(manifest.checkpoint), manifest.checkpoint_sha256, _network(job))


def resolve_model(job: BatchJob) -> ResolvedModel:
    """``job.model`` (a checkpoint path or a published name, fetched into the cache if missing) as a local file and
    its sha256. Published weights are verified by the cache against the sha256 they are published with, so only a
    checkpoint of one's own is hashed here."""
    source = resolve_model_name(job.model)
    if source.kind == "file" and not (source.path and source.path.is_file()):
        raise OrnisError(f"{job.model}: no such checkpoint file")
    path = model_file(source)
    sha = sha256_file(path) if source.weights is None else source.weights.file().sha256
    return ResolvedModel(path, sha, job.network or source.network)


def load_model(model: ResolvedModel, job: BatchJob, device: torch.device) -> tuple[Encoder | nn.Module, ModelInfo]:
    """The resolved checkpoint on ``device``, in inference mode."""
    path = model.path
    if not path.is_file():
        # A Ray task on another node than the driver: published weights live in each node's own cache
        path = model_file(resolve_model_name(job.model))
    return load_pretrained_model(path, inference=True, network=model.network, device=device)


def _network(job: BatchJob) -> str | None:
    return job.network or resolve_model_name(job.model).network
