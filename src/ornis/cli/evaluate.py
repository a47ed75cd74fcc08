"""``ornis eval knn`` and ``ornis eval linear``: accuracy of frozen embeddings (the Parquet ``ornis embed`` writes)."""

from __future__ import annotations

import argparse
from typing import Any

from ornis.cli.common import (
    check_writable,
    default_arg,
    fraction,
    non_negative_float,
    positive_float,
    positive_int,
)
from ornis.eval import evaluate_knn, evaluate_linear_probe, read_embeddings
from ornis.utils.fs import atomic_write_json

METHODS = {
    "knn": "cosine k-NN with exp(sim / T)-weighted votes (DINO's protocol)",
    "linear": "logistic-regression probe, lr and weight decay chosen on a held-out part of TRAIN",
}


def register(subparsers: Any) -> None:
    """Add ``ornis eval`` and its two methods."""
    p = subparsers.add_parser(
        "eval",
        help="k-NN and linear-probe accuracy of embeddings (Parquet from `ornis embed`)",
        description="Evaluate frozen embeddings. Labels come from each image's parent folder name, or --label-column.",
    )
    sub = p.add_subparsers(dest="eval_command", metavar="METHOD", required=True)
    for method, text in METHODS.items():
        q = sub.add_parser(method, help=text, description=text)
        q.add_argument(
            "train", metavar="TRAIN", help="embeddings of the labelled training set (Parquet file or folder)"
        )
        without = "leave-one-out over TRAIN" if method == "knn" else "a held-out part of TRAIN"
        q.add_argument("--test", metavar="TEST", help=f"embeddings of the test set; without it: {without}")
        q.add_argument("--label-column", help="column holding the labels (default: the parent folder of `path`)")
        q.add_argument("--json", metavar="FILE", help="also write the report as JSON")
        q.add_argument(
            "--drop-non-finite",
            action="store_true",
            help="leave out rows whose embedding holds NaN or Inf, and say how many (default: refuse the file)",
        )
        if method == "knn":
            _knn_arguments(q)
        else:
            _linear_arguments(q)
        q.set_defaults(func=run, method=method)


def _knn_arguments(q: argparse.ArgumentParser) -> None:
    k, temperature = default_arg(evaluate_knn, "k"), default_arg(evaluate_knn, "temperature")
    q.add_argument("-k", type=positive_int, default=k, help=f"neighbours that vote (default {k})")
    q.add_argument(
        "--temperature",
        type=positive_float,
        default=temperature,
        help=f"vote weight exp(sim / T), above 0; inf: equal votes (default {temperature})",
    )


def _linear_arguments(q: argparse.ArgumentParser) -> None:
    def default(name: str) -> Any:
        return default_arg(evaluate_linear_probe, name)

    q.add_argument("--lrs", type=positive_float, nargs="+", default=list(default("lrs")), help="learning rates to try")
    q.add_argument(
        "--weight-decays",
        type=non_negative_float,
        nargs="+",
        default=list(default("weight_decays")),
        help="L2 penalties to try",
    )
    q.add_argument("--epochs", type=positive_int, default=default("epochs"))
    q.add_argument(
        "--held-out", type=fraction, default=default("held_out"), help="fraction held out for the sweep (and test)"
    )


def run(args: argparse.Namespace) -> int:
    """Evaluate, print the report, and write it as JSON when asked (checked to be writable before the work)."""
    if args.json:
        check_writable(args.json)
    drop = args.drop_non_finite
    train = read_embeddings(args.train, label_column=args.label_column, drop_non_finite=drop)
    test = None
    if args.test:
        test = read_embeddings(
            args.test, label_column=args.label_column, class_names=train.class_names, drop_non_finite=drop
        )
    if args.method == "knn":
        report = evaluate_knn(train, test, k=args.k, temperature=args.temperature)
    else:
        report = evaluate_linear_probe(
            train, test, lrs=args.lrs, weight_decays=args.weight_decays, held_out=args.held_out, epochs=args.epochs
        )
    print(report.format(f"{args.method} evaluation of {args.train}" + (f" on {args.test}" if args.test else "")))
    if args.json:
        atomic_write_json(args.json, report.to_dict(), indent=2)
    return 0
