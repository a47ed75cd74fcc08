"""Files that ship inside the package: a small model ornis trained itself, and sample images, so a machine with no
network can still do real work (``ornis demo``).

``ornis_shapes_vit_tiny`` is a 4-block, width-128, patch-8 ViT at 48 px input (the ``vit_t16`` architecture with
config overrides recorded in the file), trained from scratch by ``scripts/train_tiny_model.py`` with ornis's supervised
recipe on procedurally generated shapes and textures (``ornis.eval.synthetic``). Its facts (architecture, classes,
size, sha256) are data, in ``manifest.json`` beside it, which the script rewrites when it installs a new model. The
weights manifest (``ornis.weights.manifest``) registers it like the published models, and ``resolve_weights`` finds it
here instead of in the cache. This module imports nothing from the rest of ornis.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
SAMPLES_DIR = ASSETS_DIR / "samples"
MANIFEST_FILE = ASSETS_DIR / "manifest.json"


@dataclass(frozen=True)
class ShippedModel:
    """A model file inside the package, as ``manifest.json`` describes it."""

    name: str
    network: str  # registry architecture name
    tag: str
    resolution: tuple[int, int]
    task: str
    num_classes: int
    description: str
    file: str  # file name in ASSETS_DIR
    format: str  # "pt" or "safetensors"
    size_mb: float
    sha256: str

    @property
    def path(self) -> Path:
        """Where the file is."""
        return ASSETS_DIR / self.file


def read_shipped_model(path: Path = MANIFEST_FILE) -> ShippedModel:
    """The shipped model's record from ``manifest.json``."""
    data = json.loads(path.read_text())
    return ShippedModel(**{**data, "resolution": tuple(data["resolution"])})


SHIPPED_MODEL = read_shipped_model()
DEMO_MODEL = SHIPPED_MODEL.name
DEMO_MODEL_FILE = SHIPPED_MODEL.path
DEMO_MODEL_SHA256 = SHIPPED_MODEL.sha256
DEMO_MODEL_SIZE_MB = SHIPPED_MODEL.size_mb


def sample_images() -> list[Path]:
    """The shipped sample images (``samples/<class>_<n>.png``), sorted."""
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
