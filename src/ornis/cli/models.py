"""``ornis models``: list, describe, download and verify architectures and published weights."""

from __future__ import annotations

import argparse
import dataclasses
import sys

import torch

from ornis.models import registry
from ornis.weights import cache
from ornis.weights.manifest import MANIFEST, get_weights, list_pretrained_models


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="list, describe, download and verify models")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="published weights (size, cached or not), or architectures")
    ls.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'hiera*'")
    ls.add_argument("--architectures", action="store_true", help="list registered architectures instead")
    ls.add_argument("--cache", help="cache folder (default: $ORNIS_CACHE or ~/.cache/ornis)")
    ls.set_defaults(func=run_list)

    info = sub.add_parser("info", help="everything known about published weights or an architecture")
    info.add_argument("name")
    info.add_argument("--cache", help="cache folder")
    info.set_defaults(func=run_info)

    dl = sub.add_parser("download", help="fetch published weights into the cache (resumable, sha256-verified)")
    dl.add_argument("names", nargs="+", metavar="NAME")
    dl.add_argument("--format", default="pt", choices=("pt", "safetensors"), help="file format (default: pt)")
    dl.add_argument("--cache", help="cache folder")
    dl.add_argument("--base-url", help="mirror to fetch from ({name} is filled in); default $ORNIS_BASE_URL")
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    dl.add_argument("--force", action="store_true", help="drop a cached copy first and fetch again")
    dl.set_defaults(func=run_download)

    verify = sub.add_parser("verify", help="re-hash cached weights against the manifest")
    verify.add_argument("names", nargs="*", metavar="NAME", help="default: every cached file")
    verify.add_argument("--cache", help="cache folder")
    verify.set_defaults(func=run_verify)


def count_parameters(network: str, num_classes: int = 0, size: tuple[int, int] | None = None) -> int:
    """Parameters of an architecture at input ``size`` (position tables grow with it), counted on the meta device
    (no memory, no init time)."""
    spec = registry.get_model_spec(network)
    with torch.device("meta"):
        net = spec.cls(spec.config, num_classes=num_classes, size=size or spec.default_size, name=network)
    return sum(p.numel() for p in net.parameters())


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run_list(args: argparse.Namespace) -> int:
    if args.architectures:
        rows = [["architecture", "family", "default size"]]
        for name in registry.list_models(args.pattern):
            spec = registry.get_model_spec(name)
            rows.append([name, spec.family, str(spec.default_size[0])])
    else:
        rows = [["name", "architecture", "resolution", "format", "size (MB)", "cached"]]
        for name in list_pretrained_models(args.pattern):
            w = get_weights(name)
            for f in w.files:
                cached = "yes" if cache.is_cached(w, f.format, args.cache) else "no"
                rows.append([name, w.network, str(w.resolution[0]), f.format, f"{f.size_mb:.1f}", cached])
    if len(rows) == 1:
        print(f"nothing matches {args.pattern!r}", file=sys.stderr)
        return 1
    print(_table(rows))
    return 0


def run_info(args: argparse.Namespace) -> int:
    if args.name in MANIFEST:
        w = get_weights(args.name)
        lines = [
            ("name", w.name),
            ("architecture", w.network),
            ("tag", w.tag),
            ("task", w.task),
            ("resolution", f"{w.resolution[0]}x{w.resolution[1]}"),
            ("classes", str(w.num_classes)),
            ("parameters (M)", f"{count_parameters(w.network, w.num_classes, w.resolution) / 1e6:.1f}"),
            ("description", w.description),
        ]
        for f in w.files:
            path = cache.local_file(w, f.format, args.cache)
            lines += [
                (f"{f.format} url", w.url(f.format, cache.base_url_for(w))),
                (f"{f.format} size (MB)", f"{f.size_mb:.1f}"),
                (f"{f.format} sha256", f.sha256),
                (f"{f.format} cache", f"{path} ({'present' if path.is_file() else 'not downloaded'})"),
            ]
    else:
        spec = registry.get_model_spec(args.name)  # UnknownModelError names close matches
        lines = [
            ("architecture", spec.name),
            ("family", spec.family),
            ("default size", str(spec.default_size[0])),
            ("parameters (M)", f"{count_parameters(spec.name) / 1e6:.1f} (without a classifier)"),
            ("published weights", ", ".join(n for n, w in MANIFEST.items() if w.network == spec.name) or "none"),
        ]
        lines += [(f"config.{f.name}", str(getattr(spec.config, f.name))) for f in dataclasses.fields(spec.config)]
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines))
    return 0


def run_download(args: argparse.Namespace) -> int:
    for name in args.names:
        get_weights(name)  # fail on a typo before any download starts
    for name in args.names:
        path = cache.download_weights(
            name,
            args.format,
            cache=args.cache,
            base_url=args.base_url,
            progress=False if args.no_progress else None,
            force=args.force,
        )
        print(f"{name}: {path} (sha256 verified)")
    return 0


def run_verify(args: argparse.Namespace) -> int:
    results = cache.verify_cached(args.names or None, cache=args.cache)
    if not results:
        print(f"no published weights in the cache ({cache.cache_dir(args.cache) / 'weights'})")
        return 0
    for r in results:
        print(f"{'ok ' if r.ok else 'BAD'} {r.name} ({r.file_format}): {r.message if not r.ok else r.path}")
    bad = sum(not r.ok for r in results)
    print(f"{len(results) - bad} ok, {bad} bad")
    return 1 if bad else 0
