"""``ornis eval knn`` and ``ornis eval linear``: accuracy of frozen embeddings (the Parquet ``ornis embed`` writes)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval",
        help="k-NN and linear-probe accuracy of embeddings (Parquet from `ornis embed`)",
        description="Evaluate frozen embeddings. Labels come from each image's parent folder name, or --label-column.",
    )
    sub = p.add_subparsers(dest="eval_command", metavar="METHOD", required=True)
    for method, text in (
        ("knn", "cosine k-NN with exp(sim / T)-weighted votes (DINO's protocol)"),
        ("linear", "logistic-regression probe, lr and weight decay chosen on a held-out part of TRAIN"),
    ):
        q = sub.add_parser(method, help=text, description=text)
        q.add_argument("train", metavar="TRAIN", help="embeddings of the labelled training set (Parquet file or folder)")
        q.add_argument("--test", metavar="TEST", help="embeddings of the test set; without it: "
                       + ("leave-one-out over TRAIN" if method == "knn" else "a held-out part of TRAIN"))
        q.add_argument("--label-column", help="column holding the labels (default: the parent folder of `path`)")
        q.add_argument("--json", metavar="FILE", help="also write the report as JSON")
        if method == "knn":
            q.add_argument("-k", type=int, default=20, help="neighbours that vote (default 20)")
            q.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim / T) (default 0.07)")
        else:
            q.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 1e-2], help="learning rates to try")
            q.add_argument("--weight-decays", type=float, nargs="+", default=[0.0, 1e-4, 1e-3], help="L2 penalties to try")
            q.add_argument("--epochs", type=int, default=100)
            q.add_argument("--held-out", type=float, default=0.2, help="fraction held out for the sweep (and test)")
        q.set_defaults(func=run, method=method)


def run(args: argparse.Namespace) -> int:
    from ornis.eval import evaluate_knn, evaluate_linear_probe, read_embeddings

    train = read_embeddings(args.train, label_column=args.label_column)
    test = read_embeddings(args.test, label_column=args.label_column, class_names=train.class_names) if args.test else None
    if args.method == "knn":
        report = evaluate_knn(train, test, k=args.k, temperature=args.temperature)
    else:
        report = evaluate_linear_probe(
            train, test, lrs=args.lrs, weight_decays=args.weight_decays, held_out=args.held_out, epochs=args.epochs
        )
    print(report.format(f"{args.method} evaluation of {args.train}" + (f" on {args.test}" if args.test else "")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report.to_dict(), f, indent=2)
    return 0
