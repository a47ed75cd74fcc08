"""Training throughput: images/s and peak memory of the real recipes through the shared loop, printed as JSON.

Each task trains for ``--steps`` optimizer steps on a generated folder of photos-like JPEGs (the full data path:
decode, augment, collate, copy to the device), and reports the median of the per-window images/s that the loop logs,
leaving out the first window (warm-up: allocator, cuDNN autotuning, compilation), and the peak GPU memory
(``torch.cuda.max_memory_allocated``; on CPU the process's peak resident memory).

Tasks (the issue's settings):
    classify  flexivit_reg1_s16_rms_ls at 240, bf16, batch 128 (fine-tuning with RandAugment)
    dino-v2   hieradet_small at 224, bf16, batch 64 (2 global 224 + 8 local 96 crops per image)

On a GPU, one command:
    python benchmarks/train_throughput.py --bf16 -o benchmarks/results/train_h100.json
On CPU, tiny models and images, to show that it runs:
    python benchmarks/train_throughput.py --tiny
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ornis.train.config import TrainConfig, TrainResult
from ornis.train.dino_v2 import DinoV2Config, DinoV2Options, HeadConfig, MultiCropConfig, train_dino_v2
from ornis.train.supervised import ClassifyOptions, train_classifier

TASKS = {
    "classify": dict(arch="flexivit_reg1_s16_rms_ls", size=240, batch=128),
    "dino-v2": dict(arch="hieradet_small", size=224, batch=64),
}
TINY = {
    "classify": dict(size=48, batch=4, config={"num_layers": 1, "hidden_dim": 64, "mlp_dim": 128, "num_heads": 2}),
    "dino-v2": dict(size=64, batch=4, config={"depths": (1, 1, 1, 1), "embed_dim": 16, "num_heads": 1}),
}


def make_images(folder: Path, count: int, side: int, seed: int = 0) -> Path:
    """JPEGs with smooth colour fields plus noise: compress and decode like photos, unlike pure noise."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        sub = folder / f"class{i % 4}"
        sub.mkdir(parents=True, exist_ok=True)
        low = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(low).resize((side, side), Image.BICUBIC)
        arr = np.clip(np.asarray(img, dtype=np.int16) + rng.integers(-12, 12, size=(side, side, 3)), 0, 255)
        Image.fromarray(arr.astype(np.uint8)).save(sub / f"{i}.jpg", quality=90)
    return folder


def _peak_memory_gib(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def run_task(task: str, args: argparse.Namespace, data: Path, out: Path) -> dict[str, Any]:
    """Train ``task`` on ``data`` and measure it."""
    spec = dict(TASKS[task])
    if args.tiny:
        spec.update(TINY[task])
    batch = args.batch_size or spec["batch"]
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=batch,
        output_dir=out / task,
        lr=1e-4,
        warmup_steps=1,
        bf16=args.bf16,
        log_every=args.window,
        num_workers=args.workers,
        device=args.device,
        compile=args.compile,
        checkpoint_every=0,
    )
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = _train(task, spec, data, cfg, args.tiny)
    wall = time.perf_counter() - start
    rates = [e["images_per_s"] for e in result.logs if "images_per_s" in e]
    steady = rates[1:] or rates
    return {
        "task": task,
        "model": spec["arch"],
        "size": spec["size"],
        "batch": batch,
        "steps": args.steps,
        "bf16": args.bf16,
        "compile": args.compile,
        "images_per_s": round(statistics.median(steady), 2) if steady else None,
        "images_per_s_windows": [round(r, 2) for r in rates],
        "peak_memory_gib": round(_peak_memory_gib(args.device), 3),
        "peak_memory_kind": "cuda max_memory_allocated" if args.device.startswith("cuda") else "process max RSS",
        "final_loss": result.losses[max(result.losses)],
        "wall_s": round(wall, 1),
    }


def _train(task: str, spec: dict[str, Any], data: Path, cfg: TrainConfig, tiny: bool) -> TrainResult:
    if task == "classify":
        opts = ClassifyOptions(
            train=data,
            arch=spec["arch"],
            size=spec["size"],
            model_config=spec.get("config"),
            auto_augment="randaugment",
            label_smoothing=0.1,
        )
        return train_classifier(opts, cfg)[0]
    crops = MultiCropConfig(global_size=spec["size"], local_size=96 if not tiny else 32)
    opts = DinoV2Options(data=data, arch=spec["arch"], model_config=spec.get("config"), crops=crops)
    if tiny:
        opts.method = DinoV2Config(heads=HeadConfig(out_dim=256, hidden_dim=64, bottleneck_dim=32))
    return train_dino_v2(opts, cfg)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tasks", default="classify,dino-v2", help="comma-separated: classify, dino-v2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (the issue's setting)")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--window", type=int, default=10, help="steps per images/s window (the first is warm-up)")
    p.add_argument("--batch-size", type=int, default=None, help="default: 128 classify, 64 dino-v2")
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--images", type=int, default=512, help="generated training images")
    p.add_argument("--tiny", action="store_true", help="tiny models and images, a few steps: a CPU smoke run")
    p.add_argument("-o", "--output", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if args.tiny:
        args.steps, args.window, args.workers, args.images = min(args.steps, 4), 2, 0, 16
    results = []
    with tempfile.TemporaryDirectory(prefix="ornis-train-bench-") as tmp:
        data = make_images(Path(tmp) / "images", args.images, 64 if args.tiny else 320)
        for task in args.tasks.split(","):
            results.append(run_task(task.strip(), args, data, Path(tmp) / "runs"))
    doc = {
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "results": results,
    }
    text = json.dumps(doc, indent=2)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
