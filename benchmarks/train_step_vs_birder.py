"""DINOv2 training step, ornis against Birder on the same config, in one run on CPU; JSON out.

The config (issue 14's protocol): scikit-learn's digits upscaled to 32 px (``train_quality.write_digits``, 1,400
images), ``vit_t16`` with patch 4 at 32 px, batch 32, 2 global crops of 32 px + 4 local crops of 16 px, DINO head
512 hidden / 256 bottleneck / 1,024 prototypes (shared with iBOT), softmax centring, DINO + iBOT + KoLeo, AdamW,
clipping at 3, fp32, eager.

How: each side is its real training entry point in a fresh subprocess (``--worker ornis``: ``train_dino_v2``
through the shared loop; ``--worker birder``: Birder's own ``birder.scripts.train_dino_v2`` script run as
``__main__`` with its command line, so nothing of its step is re-implemented here). Both read the same folder with
one loader worker and ``torch.set_num_threads(threads)``; data loading is *included* on both sides (each script's
own decode + augmentation + collate + iBOT masks, in its own worker process). The images/s are what each loop
measures itself over windows of ``--window`` steps (images of the window / wall time of the window, the same
formula in both); the first window (worker start, allocator warm-up) is dropped. The runs alternate ABBA
(ornis, birder, birder, ornis, ...) so a slow spell on a shared machine hits both; the result is the median of the
kept windows per side and their ratio.

    python benchmarks/train_step_vs_birder.py -o benchmarks/results/train_step_vs_birder_cpu.json
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import runpy
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SIZE, LOCAL_SIZE, LOCAL_CROPS, BATCH = 32, 16, 4, 32
HIDDEN, BOTTLENECK, PROTOTYPES = 512, 256, 1024
RATE = re.compile(r"R: ([0-9.]+) samples/s")


def run_ornis(data: Path, out: Path, steps: int, window: int, workers: int) -> list[float]:
    """ornis's ``train_dino_v2`` on the protocol; the loop's per-window images/s."""
    from ornis.train.config import TrainConfig
    from ornis.train.dino_v2 import DinoV2Config, DinoV2Options, HeadConfig, MultiCropConfig, train_dino_v2

    heads = HeadConfig(out_dim=PROTOTYPES, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK)
    opts = DinoV2Options(
        data=data,
        arch="vit_t16",
        model_config={"patch_size": 4},
        method=DinoV2Config(heads=heads, centering="softmax"),
        crops=MultiCropConfig(SIZE, LOCAL_SIZE, LOCAL_CROPS),
    )
    cfg = TrainConfig(
        steps=steps,
        batch_size=BATCH,
        output_dir=out,
        log_every=window,
        num_workers=workers,
        device="cpu",
        checkpoint_every=0,
        progress=False,
    )
    result = train_dino_v2(opts, cfg)
    return [e["images_per_s"] for e in result.logs if "images_per_s" in e]


def birder_argv(data: Path, steps: int, window: int, workers: int) -> list[str]:
    """Birder's ``train_dino_v2`` command line for the protocol (one virtual epoch of ``steps`` steps)."""
    return [
        "train_dino_v2",
        *("--network", "vit_t16", "--model-config", "patch_size=4", "--size", str(SIZE)),
        *("--batch-size", str(BATCH), "--local-crops-number", str(LOCAL_CROPS)),
        *("--local-crop-size", str(LOCAL_SIZE), str(LOCAL_SIZE)),
        *("--dino-out-dim", str(PROTOTYPES), "--dino-head-hidden-dim", str(HIDDEN)),
        *("--head-bottleneck-dim", str(BOTTLENECK), "--centering", "centering"),
        *("--opt", "adamw", "--lr", "0.0005", "--wd", "0.04", "--wd-end", "0.4", "--norm-wd", "0"),
        *("--clip-grad-norm", "3", "--epochs", "1", "--steps-per-epoch", str(steps)),
        *("--warmup-teacher-temp-epochs", "0", "--log-interval", str(window)),
        *("--num-workers", str(workers), "--device", "cpu", "--seed", "0"),
        *("--non-interactive", "--no-summary", "--data-path", str(data)),
    ]


def run_birder(data: Path, out: Path, steps: int, window: int, workers: int) -> list[float]:
    """Birder's own script as ``__main__`` (in this process, threads already set); its logged samples/s."""
    rates: list[float] = []

    class Rates(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            found = RATE.search(record.getMessage())
            if found:
                rates.append(float(found.group(1)))

    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # Birder writes models/ and runs/ under the working directory
    import birder.conf.settings  # noqa: F401  (Birder's logging config first, then our handler beside it)

    logging.getLogger("birder").addHandler(Rates())  # Birder's loggers do not propagate to the root
    sys.argv = birder_argv(data, steps, window, workers)
    runpy.run_module("birder.scripts.train_dino_v2", run_name="__main__")
    return rates


def worker(args: argparse.Namespace) -> None:
    """One timed run of one side; prints its per-window rates as the last line of stdout."""
    torch.set_num_threads(args.threads)
    runner = run_ornis if args.worker == "ornis" else run_birder
    rates = runner(Path(args.data), Path(args.out), args.steps, args.window, args.workers)
    print(json.dumps({"side": args.worker, "rates": rates}), flush=True)


def timed_run(side: str, args: argparse.Namespace, data: Path, out: Path) -> list[float]:
    """Start one worker subprocess and read its rates back."""
    cmd = [sys.executable, __file__, "--worker", side, "--data", str(data), "--out", str(out)]
    cmd += ["--steps", str(args.steps), "--window", str(args.window), "--workers", str(args.workers)]
    cmd += ["--threads", str(args.threads)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{side} run failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["rates"]


def summary(windows: list[list[float]]) -> dict[str, Any]:
    """Median of the kept windows (the first of each run dropped)."""
    kept = [r for run in windows for r in run[1:]]
    return {
        "images_per_s": round(statistics.median(kept), 2),
        "kept_windows": len(kept),
        "runs": [[round(r, 2) for r in run] for run in windows],
    }


def compare(args: argparse.Namespace) -> dict[str, Any]:
    """The interleaved runs, both sides, and the ratio."""
    sys.path.insert(0, str(Path(__file__).parent))
    import birder
    from train_quality import write_digits

    work = Path(args.work or tempfile.mkdtemp(prefix="ornis_vs_birder_"))
    train, _ = write_digits(work / "digits")
    windows: dict[str, list[list[float]]] = {"ornis": [], "birder": []}
    order = []
    for r in range(args.repeats):
        for side in ("ornis", "birder") if r % 2 == 0 else ("birder", "ornis"):
            start = time.perf_counter()
            windows[side].append(timed_run(side, args, train, work / f"{side}_{r}"))
            order.append(f"{side} ({time.perf_counter() - start:.0f} s)")
            print(f"{order[-1]}: {[round(x, 2) for x in windows[side][-1]]}", file=sys.stderr, flush=True)
    ours, theirs = summary(windows["ornis"]), summary(windows["birder"])
    return {
        "config": f"vit_t16 patch 4 at {SIZE} px, batch {BATCH}, 2 global {SIZE} px + {LOCAL_CROPS} local "
        f"{LOCAL_SIZE} px, head {HIDDEN} hidden / {BOTTLENECK} bottleneck / {PROTOTYPES} prototypes, softmax "
        "centring, DINO + iBOT + KoLeo, AdamW, clip 3, fp32 eager",
        "data": "scikit-learn digits, 1400 training images, 8 px upscaled to 32 px (benchmarks/train_quality.py)",
        "method": "each side's real entry point in a fresh subprocess (ornis: train_dino_v2; Birder: its "
        "birder.scripts.train_dino_v2 script run as __main__ with its own command line); data loading included on "
        f"both sides ({args.workers} loader worker each); images/s as each loop logs it per {args.window}-step "
        "window, first window of every run dropped; runs interleaved ABBA; median of kept windows",
        "steps_per_run": args.steps,
        "repeats": args.repeats,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_average_at_end": list(os.getloadavg()),
        "torch": torch.__version__,
        "birder": birder.__version__,
        "machine": platform.processor() or platform.machine(),
        "ornis": ours,
        "birder_reference": theirs,
        "ratio_ornis_over_birder": round(ours["images_per_s"] / theirs["images_per_s"], 3),
        "order": order,
        "birder_command": " ".join(birder_argv(Path("<digits/train>"), args.steps, args.window, args.workers)),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16, help="optimizer steps per run")
    p.add_argument("--window", type=int, default=4, help="steps per images/s window (the first one is dropped)")
    p.add_argument("--repeats", type=int, default=4, help="runs per side, interleaved ABBA")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=1, help="data loader worker processes, each side")
    p.add_argument("--work", default=None, help="folder for the data and runs (default: a temporary one)")
    p.add_argument("-o", "--output", default=None, help="also write the JSON here")
    p.add_argument("--worker", choices=["ornis", "birder"], help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    doc = compare(args)
    text = json.dumps(doc, indent=1)
    print(text)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
