"""Files that ship inside the package: a small model ornis trained itself, and sample images, so a machine with no
network can still do real work (``ornis demo``).

``ornis_shapes_vit_tiny`` is a 4-block, width-128, patch-8 ViT at 48 px input (the ``vit_t16`` architecture with
config overrides recorded in the file), trained from scratch by ``scripts/train_tiny_model.py`` with ornis's supervised
recipe on procedurally generated shapes and textures (``ornis.eval.synthetic``). It is registered in the weights
manifest like the published models, and ``resolve_weights`` finds it here instead of in the cache.
"""

from __future__ import annotations

from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
SAMPLES_DIR = ASSETS_DIR / "samples"

DEMO_MODEL = "ornis_shapes_vit_tiny"
DEMO_MODEL_FILE = ASSETS_DIR / f"{DEMO_MODEL}.pt"
# Written by `python scripts/train_tiny_model.py --install`
DEMO_MODEL_SHA256 = "c8362e77f438b8a04bfd2ae1880765b63ec8a61fa99bd9c50bc6f417023d6ef1"
DEMO_MODEL_SIZE_MB = 3.32


def register_shipped_weights() -> None:
    """Add the shipped model to the weights manifest (called once, when the manifest module is imported)."""
    from ornis.weights.manifest import MANIFEST, PretrainedWeights, WeightsFile, register_weights

    if DEMO_MODEL in MANIFEST:
        return
    register_weights(
        PretrainedWeights(
            name=DEMO_MODEL,
            network="vit_t16",
            tag="shapes",
            resolution=(48, 48),
            task="image_classification",
            description="A tiny ViT (0.8 M parameters) trained by ornis on generated shapes and textures (8 classes); "
            "ships inside the package for offline use and tests",
            files=(WeightsFile("pt", DEMO_MODEL_SIZE_MB, DEMO_MODEL_SHA256),),
            num_classes=8,
            extra={"local_path": str(DEMO_MODEL_FILE)},
        )
    )


def sample_images() -> list[Path]:
    """The shipped sample images (``samples/<class>_<n>.png``), sorted."""
    return sorted(p for p in SAMPLES_DIR.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
