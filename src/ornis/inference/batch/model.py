"""The job's checkpoint, resolved to a file and hashed once per job (rank 0 or the Ray driver), then loaded by every
worker from that file."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ornis.errors import OrnisError
from ornis.inference.batch.job import BatchJob
from ornis.inference.batch.manifest import Manifest
from ornis.loading import ModelInfo, is_checkpoint_path, load_pretrained_model
from ornis.models.base import Encoder
from ornis.weights.cache import resolve_weights
from ornis.weights.checkpoint import sha256_file
from ornis.weights.manifest import get_weights


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
    path = Path(job.model)
    if path.is_file():
        return ResolvedModel(path, sha256_file(path), job.network)
    if is_checkpoint_path(job.model):
        raise OrnisError(f"{job.model}: no such checkpoint file")
    path = resolve_weights(job.model, "pt")
    return ResolvedModel(path, get_weights(job.model).file("pt").sha256, _network(job))


def load_model(model: ResolvedModel, job: BatchJob, device: torch.device) -> tuple[Encoder, ModelInfo]:
    """The resolved checkpoint on ``device``, in inference mode."""
    path = model.path
    if not path.is_file() and not is_checkpoint_path(job.model):
        # A Ray task on another node than the driver: published weights live in each node's own cache
        path = resolve_weights(job.model, "pt")
    return load_pretrained_model(path, inference=True, network=model.network, device=device)


def _network(job: BatchJob) -> str | None:
    if job.network is not None or is_checkpoint_path(job.model):
        return job.network
    return get_weights(job.model).network
