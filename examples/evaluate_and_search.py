"""Embeddings end to end, offline: embed a labelled folder, measure k-NN and linear-probe accuracy, build an index
and look up neighbours. Uses the model that ships with ornis and generated images, so it runs anywhere:

    python examples/evaluate_and_search.py /tmp/ornis-example

With your own data, replace the model by a published name (e.g. "hieradet_d_small_dino-v2") and the folders by
yours (``<folder>/<class>/<image>``); the same steps are ``ornis embed``, ``ornis eval knn|linear`` and
``ornis index build|search|duplicates`` on the command line.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ornis.assets import DEMO_MODEL
from ornis.eval import evaluate_knn, evaluate_linear_probe, read_embeddings
from ornis.eval.index import build_index, near_duplicates
from ornis.eval.synthetic import write_shapes_folder
from ornis.inference.batch import embed


def main(workdir: str) -> None:
    work = Path(workdir)
    train_images = write_shapes_folder(work / "images" / "train", 800, seed=10)
    test_images = write_shapes_folder(work / "images" / "test", 400, seed=11)
    embed([str(train_images)], model=DEMO_MODEL, out=work / "emb" / "train", num_workers=0, progress=False)
    embed([str(test_images)], model=DEMO_MODEL, out=work / "emb" / "test", num_workers=0, progress=False)

    train = read_embeddings(work / "emb" / "train")  # labels: each image's folder name
    test = read_embeddings(work / "emb" / "test", class_names=train.class_names)
    print(evaluate_knn(train, test).format("k-NN (k=20, T=0.07)"))
    print(evaluate_linear_probe(train, test).format("linear probe"))

    index = build_index(train.embeddings, train.paths, model=train.model)
    index.save(work / "index")
    scores, ids = index.search(test.embeddings[:3], k=5)
    for path, row_scores, row_ids in zip(test.paths[:3], scores, ids):
        print(path, "->", [(Path(index.paths[j]).parent.name, round(float(s), 3)) for s, j in zip(row_scores, row_ids)])
    print(f"{len(near_duplicates(index, threshold=0.99))} near-duplicate pairs (cosine >= 0.99) in the training set")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "ornis-example")
