"""``ornis embed`` and ``ornis classify``: a collection of images in, Parquet parts out (``ornis.inference.batch``)."""

from __future__ import annotations

import argparse
from typing import Any

from ornis.cli.common import add_output_argument, default_of, non_negative_int, positive_int
from ornis.data.decode import DecodeOptions
from ornis.inference.batch import PRECISIONS, BatchJob, make_job, run_batch
from ornis.inference.batch.job import check_device_name
from ornis.inference.ray_runner import run_with_ray
from ornis.models.precision import PRECISION_ACCURACY

PRECISION_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def device_name(text: str) -> str:
    """argparse type: a device torch can parse (``cpu``, ``cuda``, ``cuda:1``); whether it exists is checked later."""
    try:
        return check_device_name(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a device (expected cpu, cuda or cuda:N)") from None


def register(subparsers: Any) -> None:
    """Add ``ornis embed`` and ``ornis classify``."""
    for task in ("embed", "classify"):
        what = "embeddings" if task == "embed" else "top-k labels and probabilities"
        p = subparsers.add_parser(
            task,
            help=f"write {what} of many images to Parquet (resumable; torchrun / Ray for many GPUs)",
            description=f"Write {what} of every image of INPUT to OUTPUT/part-NNNNN.parquet. Running the same "
            "command again resumes; under torchrun every rank takes shards.",
        )
        p.add_argument(
            "inputs",
            nargs="+",
            metavar="INPUT",
            help="folders, glob patterns, .txt/.csv/.parquet file lists, webdataset .tar shards; local paths or "
            "URLs (s3://bucket/photos/, gs://...; pip install 'ornis[s3]' / 'ornis[gcs]')",
        )
        p.add_argument("-m", "--model", required=True, help="published weights name or checkpoint path")
        add_output_argument(p, "output folder (a local path or a URL such as s3://bucket/emb)", aliases=("--out",))
        if task == "classify":
            top_k = default_of(BatchJob, "top_k")
            p.add_argument(
                "-k", "--top-k", type=positive_int, default=top_k, help=f"labels kept per image (default {top_k})"
            )
        else:
            p.add_argument("--float16", action="store_true", help="store embeddings (and feature maps) as float16")
        _add_job_options(p)
        p.set_defaults(func=run, task=task)


def _add_job_options(p: argparse.ArgumentParser) -> None:
    shard_size = default_of(BatchJob, "shard_size")
    p.add_argument("--features", metavar="STAGE", help="also save this detection_features map as .npy per shard")
    p.add_argument("--network", help="architecture of a checkpoint that does not say it")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=default_of(BatchJob, "batch_size"),
        help="images per batch (default 256 on GPU, 32 on CPU)",
    )
    p.add_argument(
        "--workers",
        type=non_negative_int,
        default=default_of(BatchJob, "num_workers"),
        help="decoding processes per device (default from the CPU count)",
    )
    p.add_argument(
        "--shard-size",
        type=positive_int,
        default=shard_size,
        help=f"loose files per shard (default {shard_size}; a .tar is one shard)",
    )
    p.add_argument(
        "--device",
        type=device_name,
        default=default_of(BatchJob, "device"),
        help="cpu, cuda or cuda:N (default: cuda:LOCAL_RANK when there is a GPU)",
    )
    p.add_argument(
        "--precision",
        choices=(*PRECISIONS, *PRECISION_ALIASES),
        default=default_of(BatchJob, "precision"),
        help="auto (bf16 autocast on GPU, float32 on CPU), float32, bf16 ("
        + PRECISION_ACCURACY["bf16"]
        + "), fp16, int8 (CPU: linear layers quantised; "
        + PRECISION_ACCURACY["int8"]
        + ")",
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the model (GPU, or CPU with bf16/int8)")
    p.add_argument(
        "--decode-on-device", action="store_true", help="decode and resize JPEGs on the GPU (nvJPEG) in batches"
    )
    p.add_argument("--exif-transpose", action="store_true", help="apply EXIF orientation (off: as infer_image)")
    p.add_argument(
        "--composite-alpha", action="store_true", help="composite transparent images on white (off: drop alpha)"
    )
    decode = DecodeOptions()
    p.add_argument(
        "--max-pixels",
        type=positive_int,
        help=f"larger images are listed as decompression bombs (default {decode.max_pixels})",
    )
    p.add_argument(
        "--max-bytes",
        type=positive_int,
        help=f"larger files are listed as too large, unread (default {decode.max_bytes})",
    )
    p.add_argument("--retry-errors", action="store_true", help="re-try only the files that failed in earlier runs")
    p.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=default_of(BatchJob, "progress"),
        help="progress bar on stderr (default: on a terminal)",
    )
    p.add_argument(
        "--ray", action="store_true", help="run on Ray (pip install 'ornis[ray]') instead of in this process"
    )
    p.add_argument("--ray-address", help="Ray cluster address (default: start or join a local one)")
    p.add_argument(
        "--ray-workers",
        type=positive_int,
        help="Ray actors, each loading the model once (default: one per GPU, else per 4 CPUs)",
    )


def job_from_args(args: argparse.Namespace) -> BatchJob:
    """The ``BatchJob`` a parsed ``ornis embed`` / ``ornis classify`` command line asks for."""
    return make_job(
        args.inputs,
        model=args.model,
        out=args.output,
        task=args.task,
        top_k=getattr(args, "top_k", default_of(BatchJob, "top_k")),
        embedding_dtype="float16" if getattr(args, "float16", False) else "float32",
        features=args.features,
        network=args.network,
        batch_size=args.batch_size,
        num_workers=args.workers,
        shard_size=args.shard_size,
        device=args.device,
        precision=PRECISION_ALIASES.get(args.precision, args.precision),
        compile=args.compile,
        decode_on_device=args.decode_on_device,
        exif_transpose=args.exif_transpose,
        composite_alpha=args.composite_alpha,
        max_pixels=args.max_pixels,
        max_bytes=args.max_bytes,
        retry_errors=args.retry_errors,
        progress=args.progress,
    )


def run(args: argparse.Namespace) -> int:
    """Run the batch job in this process (one rank under torchrun) or on Ray."""
    job = job_from_args(args)
    if args.ray:
        run_with_ray(job, address=args.ray_address, num_actors=args.ray_workers)
    else:
        run_batch(job)  # the summary is logged by rank 0
    return 0
