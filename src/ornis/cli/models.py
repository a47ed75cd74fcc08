"""``ornis models``: list, describe, download and verify architectures and published weights."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path
from typing import Any

import torch

from ornis.loading import identify_network, resolve_model_name
from ornis.models import registry
from ornis.weights import cache
from ornis.weights.checkpoint import read_checkpoint, sha256_file
from ornis.weights.manifest import (
    DEFAULT_FILE_FORMAT,
    FILE_FORMATS,
    MANIFEST,
    PretrainedWeights,
    find_by_sha256,
    get_weights,
    list_pretrained_models,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``models`` command and its actions."""
    parser = subparsers.add_parser("models", help="list, describe, download and verify models")
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    ls = sub.add_parser("list", help="published weights (size, cached or not), or architectures")
    ls.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'hiera*'")
    ls.add_argument("--architectures", action="store_true", help="list registered architectures instead")
    ls.add_argument("--cache", help="cache folder (default: $ORNIS_CACHE or ~/.cache/ornis)")
    ls.set_defaults(func=run_list)

    info = sub.add_parser("info", help="everything known about published weights, an architecture or a checkpoint")
    info.add_argument("name", help="published weights name, architecture name or checkpoint path")
    info.add_argument("--cache", help="cache folder")
    info.set_defaults(func=run_info)

    dl = sub.add_parser("download", help="fetch published weights into the cache (resumable, sha256-verified)")
    dl.add_argument("names", nargs="+", metavar="NAME")
    dl.add_argument(
        "--format",
        default=DEFAULT_FILE_FORMAT,
        choices=FILE_FORMATS,
        help=f"file format (default: {DEFAULT_FILE_FORMAT})",
    )
    dl.add_argument("--cache", help="cache folder")
    dl.add_argument(
        "--base-url",
        help="Hugging Face hub endpoint or mirror to fetch from, like HF_ENDPOINT; default $ORNIS_BASE_URL",
    )
    dl.add_argument("--no-progress", action="store_true", help="no progress bar")
    dl.add_argument("--force", action="store_true", help="drop a cached copy first and fetch again")
    dl.set_defaults(func=run_download)

    verify = sub.add_parser("verify", help="re-hash cached weights against the manifest")
    verify.add_argument("names", nargs="*", metavar="NAME", help="default: every cached file")
    verify.add_argument("--cache", help="cache folder")
    verify.set_defaults(func=run_verify)


def count_parameters(
    network: str,
    num_classes: int = 0,
    size: tuple[int, int] | None = None,
    config: dict[str, Any] | None = None,
) -> int:
    """Parameters of an architecture with the ``config`` overrides a checkpoint records, at input ``size`` (position
    tables grow with it), counted on the meta device (no memory, no init time)."""
    spec = registry.get_model_spec(network)
    cfg = registry.apply_overrides(spec.config, config) if config else spec.config
    with torch.device("meta"):
        net = spec.cls(cfg, num_classes=num_classes, size=size or spec.default_size, name=network)
    return sum(p.numel() for p in net.parameters())


def weights_config(w: PretrainedWeights) -> dict[str, Any] | None:
    """The config overrides published weights are built with: those their file records when it is on disk (always
    so for weights that ship with ornis, e.g. a 4-block ``vit_t16``), else none (published files are registered
    variants)."""
    shipped = w.extra.get("local_path")
    return read_checkpoint(shipped).config if shipped and Path(shipped).is_file() else None


def _millions(count: int) -> str:
    """A parameter count in millions, with two decimals below 10 M (a tiny model's 0.82, not 0.8)."""
    return f"{count / 1e6:.2f}" if count < 10_000_000 else f"{count / 1e6:.1f}"


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def run_list(args: argparse.Namespace) -> int:
    """Print a table of published weights (or architectures) matching the pattern."""
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
    """Print what is known about a name, resolved as ``load_pretrained_model`` resolves it."""
    source = resolve_model_name(args.name)  # UnknownModelError names close matches among weights and architectures
    if source.kind == "weights":
        assert source.weights is not None
        lines = _weights_lines(source.weights, args.cache)
    elif source.kind == "architecture":
        lines = _architecture_lines(source.name)
    else:
        assert source.path is not None
        lines = _file_lines(source.path)
    width = max(len(k) for k, _ in lines)
    print("\n".join(f"{k.ljust(width)}  {v}" for k, v in lines))
    return 0


def _weights_lines(w: PretrainedWeights, cache_folder: str | None) -> list[tuple[str, str]]:
    lines = [
        ("name", w.name),
        ("architecture", w.network),
        ("tag", w.tag),
        ("task", w.task),
        ("resolution", f"{w.resolution[0]}x{w.resolution[1]}"),
        ("classes", str(w.num_classes)),
        ("parameters (M)", _millions(count_parameters(w.network, w.num_classes, w.resolution, weights_config(w)))),
        ("description", w.description),
    ]
    shipped = bool(w.extra.get("local_path"))
    for f in w.files:
        path = cache.local_file(w, f.format, cache_folder)
        if shipped:
            where = ("file", f"{path} ({'ships with ornis' if path.is_file() else 'missing: reinstall ornis'})")
        else:
            where = ("cache", f"{path} ({'present' if path.is_file() else 'not downloaded'})")
        lines += [
            (f"{f.format} url", "none: ships with ornis" if shipped else w.url(f.format, cache.base_url_for(w))),
            (f"{f.format} size (MB)", f"{f.size_mb:.1f}"),
            (f"{f.format} sha256", f.sha256),
            (f"{f.format} {where[0]}", where[1]),
        ]
    return lines


def _architecture_lines(name: str) -> list[tuple[str, str]]:
    spec = registry.get_model_spec(name)
    lines = [
        ("architecture", spec.name),
        ("family", spec.family),
        ("default size", str(spec.default_size[0])),
        ("parameters (M)", f"{_millions(count_parameters(spec.name))} (without a classifier)"),
        ("published weights", ", ".join(n for n, w in MANIFEST.items() if w.network == spec.name) or "none"),
    ]
    return lines + [(f"config.{f.name}", str(getattr(spec.config, f.name))) for f in dataclasses.fields(spec.config)]


def _file_lines(path: Path) -> list[tuple[str, str]]:
    ckpt = read_checkpoint(path)
    sha = sha256_file(path)
    published = find_by_sha256(sha)
    return [
        ("file", str(path)),
        ("architecture", identify_network(ckpt, path)),
        ("task", ckpt.task),
        ("resolution", f"{ckpt.size[0]}x{ckpt.size[1]}"),
        ("classes", str(ckpt.num_classes)),
        ("config overrides", str(ckpt.config or {})),
        ("tensors", f"{len(ckpt.state)} ({sum(t.numel() for t in ckpt.state.values()) / 1e6:.1f} M values)"),
        ("sha256", sha),
        ("published as", published.name if published else "none (not a published file)"),
    ]


def run_download(args: argparse.Namespace) -> int:
    """Fetch published weights into the cache, checking every name first."""
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
    """Re-hash cached files; exit code 1 when one is bad."""
    results = cache.verify_cached(args.names or None, cache=args.cache)
    if not results:
        print(f"no published weights in the cache ({cache.cache_dir(args.cache) / 'weights'})")
        return 0
    for r in results:
        print(f"{'ok ' if r.ok else 'BAD'} {r.name} ({r.file_format}): {r.message if not r.ok else r.path}")
    bad = sum(not r.ok for r in results)
    print(f"{len(results) - bad} ok, {bad} bad")
    return 1 if bad else 0
