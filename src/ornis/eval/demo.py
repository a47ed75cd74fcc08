"""``ornis demo``: real work on a machine with no network, with the model and the images that ship in the package.

It classifies and embeds the sample images with the batch runner (``ornis.inference.batch``, Parquet out), finds
each sample's nearest neighbours among the others, and measures the model on a freshly generated held-out set
(``ornis.eval.synthetic``, the seed the training script holds out): top-1 of the classifier and of a k-NN on the
embeddings. Nothing is downloaded and nothing is written outside ``out``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from ornis.assets import DEMO_MODEL, SAMPLES_DIR
from ornis.data.transforms import classification_transform
from ornis.eval.index import build_index
from ornis.eval.knn import evaluate_knn
from ornis.eval.labels import EmbeddingTable, read_embeddings
from ornis.eval.synthetic import SHAPE_CLASSES, generate_shapes
from ornis.inference.batch import classify, embed
from ornis.loading import load_pretrained_model
from ornis.weights.checkpoint import get_size_from_signature

HELD_OUT_SEED = 2  # scripts/train_tiny_model.py trains on seed 1 and holds out seed 2
DRAW_SIZE = 64  # images are drawn at 64 px (as the samples are) and the model's transform scales them


@dataclass
class SampleResult:
    """One sample image: its true and predicted class, the top probability and its nearest neighbours."""

    path: str
    true_class: str  # from the file name, ``<class>_<n>.jpg``
    predicted: str
    probability: float
    neighbours: list[tuple[str, float]]  # (file name, cosine similarity), most similar first


@dataclass
class DemoResult:
    """What ``run_demo`` found: per-sample results, top-1 accuracies (fractions) and where the Parquet went."""

    model: str
    embeddings_dir: Path
    classes_dir: Path
    samples: list[SampleResult]
    sample_top1: float
    held_out_count: int
    held_out_top1: float
    held_out_knn_top1: float
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)

    def format(self) -> str:
        """A text report: one line per sample image (``x`` marks a wrong prediction), then the totals."""
        lines = [f"model {self.model} (shipped with ornis; no network used)", ""]
        width = max(len(Path(s.path).name) for s in self.samples)
        lines.append(f"{'image':<{width}}  {'predicted':<9}  prob   nearest neighbours (cosine)")
        for s in self.samples:
            mark = " " if s.predicted == s.true_class else "x"
            near = ", ".join(f"{name} {sim:.2f}" for name, sim in s.neighbours)
            lines.append(f"{Path(s.path).name:<{width}}  {s.predicted:<9}{mark} {s.probability:.2f}  {near}")
        lines += [
            "",
            f"samples: {sum(s.predicted == s.true_class for s in self.samples)}/{len(self.samples)} "
            "classified correctly",
            (
                f"held-out generated set ({self.held_out_count} images, never seen in training): "
                f"top-1 {self.held_out_top1:.3f} (classifier), {self.held_out_knn_top1:.3f} (k-NN on embeddings, "
                f"leave-one-out); chance is {1 / len(SHAPE_CLASSES):.3f}"
            ),
            f"embeddings: {self.embeddings_dir}  classes: {self.classes_dir}  ({self.seconds:.1f} s)",
        ]
        return "\n".join(lines)


def sample_class(path: str | os.PathLike) -> str:
    """The class in a sample file's name: ``<class>_<n>.jpg`` -> ``<class>``."""
    return Path(path).stem.rsplit("_", 1)[0]


def run_demo(
    out: str | os.PathLike,
    *,
    model: str = DEMO_MODEL,
    samples_dir: str | os.PathLike = SAMPLES_DIR,
    held_out: int = 400,
    neighbours: int = 3,
) -> DemoResult:
    """Run the demo, writing ``out/embeddings`` and ``out/classes`` (Parquet, as ``ornis embed`` / ``classify``).

    ``held_out`` (at least 2: the k-NN is leave-one-out) and ``neighbours`` are checked, and ``out`` created, before
    any work: a bad value is a ``ValueError`` naming it, an ``out`` that is a file the ``OSError`` of creating it.
    """
    for name, value, minimum in (("held_out", held_out, 2), ("neighbours", neighbours, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    emb_dir, cls_dir = out / "embeddings", out / "classes"
    # A handful of images: no loader worker processes to start, no progress bar
    options = {"num_workers": 0, "batch_size": 32, "progress": False, "device": "cpu"}
    embed([str(samples_dir)], model=model, out=emb_dir, **options)
    classify([str(samples_dir)], model=model, out=cls_dir, top_k=3, **options)
    timings = {"batch_runner": time.perf_counter() - started}

    table = read_embeddings(emb_dir, labelled=False)
    classes = _read_classes(cls_dir)
    index = build_index(table.embeddings, table.paths, kind="exact", model=model)
    scores, ids = index.search(table.embeddings, neighbours + 1)
    samples = []
    for row, path in enumerate(table.paths):
        predicted, probability = classes[path]
        near = [(Path(index.paths[j]).name, float(s)) for s, j in zip(scores[row], ids[row]) if j != row][:neighbours]
        samples.append(SampleResult(path, sample_class(path), predicted, probability, near))
    sample_top1 = float(np.mean([s.predicted == s.true_class for s in samples]))

    t = time.perf_counter()
    net, info = load_pretrained_model(model, inference=True)
    transform = classification_transform(get_size_from_signature(info.signature), info.rgb_stats)
    images, labels = generate_shapes(held_out, HELD_OUT_SEED, size=DRAW_SIZE)
    batch = torch.stack([transform(img) for img in images])
    with torch.inference_mode():
        embeddings = net.embedding(batch)
        logits = net.classify(embeddings)
    # The checkpoint's class order is the training folder's (sorted names), as SHAPE_CLASSES is
    idx_to_class = {v: k for k, v in info.class_to_idx.items()}
    predicted_names = [idx_to_class[int(i)] for i in logits.argmax(dim=1)]
    held_out_top1 = float(np.mean([p == SHAPE_CLASSES[int(y)] for p, y in zip(predicted_names, labels)]))
    held_table = EmbeddingTable(
        [str(i) for i in range(held_out)], embeddings.numpy(), labels.astype(np.int64), list(SHAPE_CLASSES)
    )
    knn_top1 = evaluate_knn(held_table).top1
    timings["held_out"] = time.perf_counter() - t
    return DemoResult(
        model=model,
        embeddings_dir=emb_dir,
        classes_dir=cls_dir,
        samples=samples,
        sample_top1=sample_top1,
        held_out_count=held_out,
        held_out_top1=held_out_top1,
        held_out_knn_top1=knn_top1,
        seconds=time.perf_counter() - started,
        timings=timings,
    )


def _read_classes(folder: Path) -> dict[str, tuple[str, float]]:
    """path -> (top label, its probability) from the batch classifier's Parquet."""
    rows = pq.read_table(folder, columns=["path", "labels", "probabilities"]).to_pylist()
    return {r["path"]: (r["labels"][0], float(r["probabilities"][0])) for r in rows}
