"""End-to-end batch embedding throughput (JPEG files -> Parquet) next to model-only throughput, in one run.

End-to-end is ``ornis.inference.batch.run_batch`` (what ``embed`` runs) on a folder of JPEGs (or webdataset tars
with ``--tar``) of typical photo size (500x375), written to Parquet: decoding in DataLoader workers, resizing, pinned
copies, the model, writing. Model-only is the same ``ModelRunner`` (on-device normalisation, autocast, compile) fed
an already decoded uint8 batch that sits on the device: what the model alone can do. The ratio says how much of the
model's speed the pipeline keeps. Prints (and with ``-o`` writes) one JSON document.

The model is a published name, a checkpoint path, or ``--arch NAME`` for random weights (no download needed).

GPU (the issue's two figures; 16 CPU cores):
    python benchmarks/pipeline.py --arch hieradet_small --size 224 --images 20000 --device cuda --dtype bf16 --compile
    python benchmarks/pipeline.py --arch vit_reg4_l14_nps_ls --size 224 --images 20000 --tar --device cuda \\
        --dtype bf16 --compile
CPU (shows it works):
    python benchmarks/pipeline.py --arch vit_t16 --size 224 --images 200 --device cpu --dtype fp32 --batch-size 32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import ornis
from ornis.inference.batch import ModelRunner, default_num_workers, load_model, make_job, resolve_model, run_batch

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def make_jpegs(folder: Path, count: int, width: int = 500, height: int = 375, seed: int = 0) -> list[Path]:
    """``count`` photo-like JPEGs (quality 90): random crops of scikit-image's sample photos when it is installed,
    else smooth random images, which compress and decode like photos (noise would not)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    sources = _sample_photos()
    paths = []
    for i in range(count):
        path = folder / f"img{i:07d}.jpg"
        paths.append(path)
        if path.exists():
            continue
        if sources:
            src = sources[i % len(sources)]
            scale = rng.uniform(1.0, 1.6)
            big = src.resize((int(width * scale), int(height * scale)), Image.Resampling.BILINEAR)
            x, y = rng.integers(0, big.width - width + 1), rng.integers(0, big.height - height + 1)
            image = big.crop((x, y, x + width, y + height))
        else:
            small = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
            image = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
        image.save(path, quality=90)
    return paths


def _sample_photos() -> list[Image.Image]:
    try:
        from skimage import data
    except ImportError:
        return []
    out = []
    for name in ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry"):
        array = getattr(data, name)()
        out.append(Image.fromarray(array).convert("RGB"))
    return out


def make_tars(paths: list[Path], folder: Path, per_tar: int = 1000) -> list[Path]:
    """Webdataset shards: ``<key>.jpg`` members, ``per_tar`` to a tar."""
    folder.mkdir(parents=True, exist_ok=True)
    tars = []
    for t, start in enumerate(range(0, len(paths), per_tar)):
        tar = folder / f"shard-{t:05d}.tar"
        tars.append(tar)
        if tar.exists():
            continue
        with tarfile.open(tar.with_suffix(".tmp"), "w") as tf:
            for p in paths[start : start + per_tar]:
                tf.add(p, arcname=p.name)
        os.replace(tar.with_suffix(".tmp"), tar)
    return tars


def model_only(job, batch_size: int, iters: int, warmup: int) -> float:
    """images/s of ModelRunner on an already decoded uint8 batch resident on the device, results back on the host."""
    device = torch.device(job.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    net, info = load_model(resolve_model(job), job, device)  # as every batch worker loads it
    runner = ModelRunner(net, info, job, device)
    h, w = net.size
    pixels = torch.randint(0, 256, (batch_size, 3, h, w), dtype=torch.uint8, device=device)
    for _ in range(warmup):
        runner(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        runner(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch_size * iters / (time.perf_counter() - start)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The benchmark's command line."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="published weights name or checkpoint path")
    p.add_argument("--arch", default="vit_t16", help="architecture with random weights, when --model is not given")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--images", type=int, default=200)
    p.add_argument(
        "--data", type=Path, help="folder for the generated JPEGs (kept between runs; default: a temp folder)"
    )
    p.add_argument("--tar", action="store_true", help="read webdataset tars of 1000 images instead of loose files")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--decode-on-device", action="store_true", help="JPEGs decoded by nvJPEG on the GPU")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--workers", type=int, help="DataLoader workers (default from the CPU count)")
    p.add_argument("--iters", type=int, default=20, help="model-only timed batches")
    p.add_argument("-o", "--output", type=Path, help="also write the JSON here")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Generate the images, run the batch runner and the model alone on them, print the JSON."""
    args = parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="ornis-pipeline-"))
    try:
        data = args.data or scratch / "jpegs"
        t0 = time.perf_counter()
        paths = make_jpegs(data, args.images)
        inputs = [str(t) for t in make_tars(paths, data.parent / f"{data.name}-tars")] if args.tar else [str(data)]
        prep_s = time.perf_counter() - t0
        if args.model:
            checkpoint = args.model
        else:
            torch.manual_seed(0)
            checkpoint = ornis.save_model(
                ornis.build_model(args.arch, num_classes=0, size=args.size), scratch / f"{args.arch}_bench.pt"
            )
        device = torch.device(args.device)
        options = {
            "device": args.device,
            "precision": DTYPES[args.dtype],
            "compile": args.compile,
            "decode_on_device": args.decode_on_device,
            "batch_size": args.batch_size or (256 if device.type == "cuda" else 32),
            "num_workers": args.workers,
            "progress": sys.stderr.isatty(),
            "shard_size": 1000,
        }
        job = make_job(inputs, model=checkpoint, out=scratch / "out", **options)
        summary = run_batch(job)
        model_rate = model_only(job, options["batch_size"], args.iters, warmup=3 if args.compile else 1)
        text = json.dumps(report(args, job, summary, model_rate, prep_s), indent=2)
        print(text)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text + "\n")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


def report(args: argparse.Namespace, job, summary, model_rate: float, prep_s: float) -> dict:
    """The benchmark's JSON document."""
    device = torch.device(args.device)
    steady = summary.done / summary.loop_s if summary.loop_s else 0.0
    return {
        "model": str(args.model or args.arch),
        "size": args.size,
        "input": "webdataset tars" if args.tar else "JPEG files",
        "images": args.images,
        "image_size": [500, 375],
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "cpu_count": len(os.sched_getaffinity(0)),
        "dtype": args.dtype,
        "compile": args.compile,
        "decode_on_device": args.decode_on_device,
        "batch_size": job.batch_size,
        "workers": args.workers if args.workers is not None else default_num_workers(device, 1),
        "end_to_end_images_per_s": round(steady, 1),
        "end_to_end_with_startup_images_per_s": round(summary.images_per_s, 1),
        "model_only_images_per_s": round(model_rate, 1),
        "end_to_end_over_model_only": round(steady / model_rate, 3) if model_rate else None,
        "rows_written": summary.done,
        "errors": summary.errors,
        "wall_s": round(summary.wall_s, 2),
        "steady_s": round(summary.loop_s, 2),
        "decode_cpu_s": round(summary.decode_s, 2),
        "wait_for_data_s": round(summary.wait_s, 2),
        "model_s": round(summary.model_s, 2),
        "data_prep_s": round(prep_s, 2),
        "torch": torch.__version__,
        "ornis": ornis.__version__,
    }


if __name__ == "__main__":
    sys.exit(main())
