"""Inference throughput: ornis against the reference implementations, same process, same inputs.

For each architecture it times ornis and every reference that has the model (birder, timm, transformers, sam2,
hiera-transformer — whichever are installed), eager and compiled, fp32 and bf16 autocast, and prints one JSON
document: images/s, peak GPU memory, achieved TFLOP/s (FLOPs counted once on ornis's model with
torch.utils.flop_counter) and each reference's ratio to ornis. All models get the same random weights' shapes
but their own random values: speed does not depend on the values.

GPU (the issue's setting; batch 256 at the card size, 32 for ViT-L at 518):
    python benchmarks/throughput.py --device cuda --dtype bf16 --compile both -o benchmarks/results/h100.json
CPU (fp32 eager, small batches; ornis is also timed with its oneDNN linear kernels off, ``ornis-pytorch-layers``,
and ``paired_speedup_of_onednn_kernels`` is what they gain):
    python benchmarks/throughput.py --device cpu --dtype fp32 --compile off --batch 8 --iters 3

The CPU fast path (``ornis.models.precision.prepare_for_inference``) is timed for ornis only, per mode, with
``--fast-path bf16 int8 [bf16+compile int8+compile fp32+compile]``: images/s, peak resident memory while timing,
and accuracy against ornis fp32 on real photos (scikit-image's samples): the smallest embedding cosine over the
photos, and top-1 agreement of the shipped classifier ``ornis_shapes_vit_tiny`` on its sample images and the photos
(random weights make the 550-class bird head's top-1 meaningless, so it is not used for agreement):
    python benchmarks/throughput.py --device cpu --dtype fp32 --compile off --batch 8 --fast-path bf16 int8 \
        -o benchmarks/results/cpu_fast_path.json

Every figure is the median over ``--repeats`` timed runs of ``--iters`` iterations each, after ``--warmup``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import ornis


@dataclass(frozen=True)
class Arch:
    ornis_name: str
    size: int
    gpu_batch: int
    references: tuple[str, ...]  # "package:model name"


ARCHS = {
    "hieradet_small": Arch("hieradet_small", 224, 256, ("birder:hieradet_small", "timm:sam2_hiera_small")),
    "hieradet_d_small": Arch("hieradet_d_small", 224, 256, ("birder:hieradet_d_small",)),
    "hiera_abswin_base": Arch(
        "hiera_abswin_base",
        224,
        256,
        ("birder:hiera_abswin_base", "timm:hiera_base_abswin_256", "hiera:hiera_base_224"),
    ),
    "vit_reg4_l14_nps_ls": Arch(
        "vit_reg4_l14_nps_ls",
        518,
        32,
        (
            "birder:vit_reg4_l14_nps_ls",
            "timm:vit_large_patch14_reg4_dinov2",
            "transformers:dinov2-with-registers-large",
        ),
    ),
    "flexivit_reg1_s16_rms_ls": Arch("flexivit_reg1_s16_rms_ls", 240, 256, ("birder:flexivit_reg1_s16_rms_ls",)),
}


def build_reference(ref: str, size: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """The reference model as a callable that computes its embedding (or closest equivalent)."""
    package, name = ref.split(":", 1)
    if package == "birder":
        from birder.model_registry import registry

        net = registry.net_factory(name, 0, 3, size=(size, size))
        return net.embedding, net
    if package == "timm":
        import timm

        kwargs = {"img_size": size} if "sam2" not in name else {}
        net = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
        return net, net
    if package == "transformers":
        from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

        cfg = Dinov2WithRegistersConfig(
            hidden_size=1024,
            num_hidden_layers=24,
            num_attention_heads=16,
            image_size=size,
            patch_size=14,
            num_register_tokens=4,
            attn_implementation="sdpa",
        )
        net = Dinov2WithRegistersModel(cfg)
        return (lambda x: net(pixel_values=x).pooler_output), net
    if package == "hiera":
        import hiera

        net = getattr(hiera, name)(pretrained=False, num_classes=1000)
        return net, net
    raise ValueError(f"unknown reference package {package!r}")


class PeakRSS:
    """Peak resident set size of this process (MiB) while the block runs, sampled every 2 ms (CPU memory)."""

    def __enter__(self) -> PeakRSS:
        self.peak = self.start = _rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, _rss_mib())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mib())


def _rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux
        return float("nan")


def sig4(value: float) -> float:
    """Four significant digits: 0.1834 img/s (ViT-L at 518 on a CPU) as well as 13,472 (a GPU)."""
    return float(f"{value:.4g}")


def measure(fn, x: torch.Tensor, dtype: str, iters: int, warmup: int, repeats: int = 5) -> dict:
    """Images/s as the median of ``repeats`` timed runs of ``iters`` calls; peak memory while timing."""
    device = x.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    times = []
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with PeakRSS() as rss:
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(iters):
                    fn(x)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
    per_run = statistics.median(times)
    out = {
        "img_per_s": sig4(x.shape[0] * iters / per_run),
        "img_per_s_runs": [sig4(x.shape[0] * iters / t) for t in times],
    }
    if device.type == "cuda":
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    else:
        out["peak_rss_mib"] = round(rss.peak, 1)
    return out


# -- the CPU fast path ---------------------------------------------------------------------------------------------
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "hubble_deep_field", "immunohistochemistry", "coins")
RGB_STATS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def photos(size: int) -> torch.Tensor:
    """scikit-image's sample photographs, as the card transform makes them, (N, 3, size, size)."""
    from PIL import Image
    from skimage import data

    transform = ornis.classification_transform((size, size), RGB_STATS)
    images = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in PHOTOS]
    return torch.stack([transform(img) for img in images])


def parse_mode(mode: str) -> tuple[str, bool]:
    precision, _, extra = mode.partition("+")
    return precision, extra == "compile"


def weights_mib(module: torch.nn.Module) -> float:
    """Bytes of the parameters, buffers and packed int8 weights."""
    total = sum(t.numel() * t.element_size() for t in list(module.parameters()) + list(module.buffers()))
    for m in module.modules():
        packed = getattr(m, "_packed_params", None)
        if packed is not None and hasattr(packed, "_weight_bias"):
            w, b = packed._weight_bias()
            total += w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
    return round(total / 2**20, 1)


def agreement(reference: torch.Tensor, other: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(reference.float(), other.float(), dim=1)
    return {"cosine_min": round(cos.min().item(), 5), "cosine_mean": round(cos.mean().item(), 5)}


def fast_path_runs(net, x: torch.Tensor, args: argparse.Namespace, size: int, key: str) -> dict:
    """Each fast-path mode of ornis against ornis fp32 eager, their timed runs taken in turn: images/s, the median
    per-round speed-up over fp32, peak resident memory of one call, weights' size, and the embedding cosine
    against fp32 on the photos."""
    from ornis.models.layers import LayerScale
    from ornis.models.precision import prepare_for_inference

    # Random weights: layer scale's 1e-5 init would make every block a no-op and the accuracy check trivial; trained
    # models' gammas are orders of magnitude larger, so set them to 1 (speed does not depend on the values)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, LayerScale):
                m.gamma.fill_(1.0)
    images = photos(size)
    with torch.inference_mode():
        reference = net.embedding(images)
    runs, models = {}, {"fp32": net}
    for mode in args.fast_path:
        precision, compiled = parse_mode(mode)
        models[mode] = prepare_for_inference(net, precision, compile=compiled)
    try:
        timed = measure_interleaved(
            {m: f.embedding for m, f in models.items()}, x, "fp32", args.iters, args.warmup, args.repeats
        )
    except Exception as e:
        return {f"ornis|{mode}": {"error": f"{type(e).__name__}: {e}"[:300]} for mode in args.fast_path}
    for mode in args.fast_path:
        fast, r = models[mode], timed[mode]
        ratios = [a / b for a, b in zip(r["img_per_s_runs"], timed["fp32"]["img_per_s_runs"])]
        r["paired_speedup_vs_ornis_fp32_eager"] = round(statistics.median(ratios), 3)
        with torch.inference_mode(), PeakRSS() as rss:
            fast.embedding(x)
        r["peak_rss_mib"] = round(rss.peak, 1)
        with torch.inference_mode():
            r.update(agreement(reference, fast.embedding(images)))
        r["weights_mib"] = weights_mib(fast)
        runs[f"ornis|{mode}"] = r
        print(f"{key:26s} {'ornis|' + mode:60s} {r}", file=sys.stderr)
    runs["ornis|fp32_eager_with_fast_path"] = timed["fp32"]
    del models
    gc.collect()
    torch._dynamo.reset()
    return runs


def classifier_agreement(modes: list[str]) -> dict:
    """Top-1 agreement with fp32 of the shipped classifier (real weights) per mode, on its 16 sample images and the
    photos, and its embedding cosine."""
    from PIL import Image

    from ornis.assets import SAMPLES_DIR
    from ornis.models.precision import prepare_for_inference

    net, info = ornis.load_pretrained_model("ornis_shapes_vit_tiny", inference=True)
    size = ornis.get_size_from_signature(info.signature)
    transform = ornis.classification_transform(size, info.rgb_stats)
    samples = [transform(Image.open(p).convert("RGB")) for p in sorted(SAMPLES_DIR.glob("*.jpg"))]
    images = torch.cat([torch.stack(samples), photos(size[0])])
    with torch.inference_mode():
        ref_emb = net.embedding(images)
        ref_top1 = net.classify(ref_emb).argmax(1)
    out = {"images": images.shape[0]}
    for mode in modes:
        precision, compiled = parse_mode(mode)
        fast = prepare_for_inference(net, precision, compile=compiled)
        with torch.inference_mode():
            emb = fast.embedding(images)
            top1 = fast.classify(emb).argmax(1)
        out[mode] = {"top1_agreement": round((top1 == ref_top1).float().mean().item(), 4), **agreement(ref_emb, emb)}
        torch._dynamo.reset()
    return out


def count_gflops(net: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net.embedding(x)
    return counter.get_total_flops() / 1e9


def measure_interleaved(fns: dict[str, Callable], x: torch.Tensor, dtype: str, iters: int, warmup: int, repeats: int):
    """Like ``measure`` for several implementations at once, their timed runs taken in turn (ornis, ref 1, ref 2,
    ornis, ...), so that load from other processes on a shared machine falls on all of them alike."""
    autocast = torch.autocast(x.device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode(), autocast:
        for fn in fns.values():
            for _ in range(warmup):
                fn(x)
        for _ in range(repeats):
            for label, fn in fns.items():
                start = time.perf_counter()
                for _ in range(iters):
                    fn(x)
                if x.device.type == "cuda":
                    torch.cuda.synchronize()
                times[label].append(time.perf_counter() - start)
    return {
        label: {
            "img_per_s": sig4(x.shape[0] * iters / statistics.median(t)),
            "img_per_s_runs": [sig4(x.shape[0] * iters / v) for v in t],
        }
        for label, t in times.items()
    }


def pytorch_layers(fn: Callable) -> Callable:
    """``fn`` with ornis's oneDNN linear kernels off (``ornis.models.onednn``): what they gain on the CPU."""
    from ornis.models import onednn

    def run(x: torch.Tensor) -> torch.Tensor:
        with onednn.enabled(False):
            return fn(x)

    return run


def paired_speedups(runs: dict) -> dict:
    """ornis over each reference, eager, as the median of the per-round ratios: the rounds were timed in turn, so
    a ratio compares two runs under the same load from other processes (steadier than a ratio of medians)."""
    ours = runs.get("ornis|eager", {}).get("img_per_s_runs")
    out = {}
    plain = runs.get("ornis-pytorch-layers|eager", {}).get("img_per_s_runs")
    if ours and plain:
        out["paired_speedup_of_onednn_kernels"] = round(statistics.median(a / b for a, b in zip(ours, plain)), 3)
    for label, r in runs.items():
        if ours and label.endswith("|eager") and not label.startswith("ornis") and r.get("img_per_s_runs"):
            ratios = [a / b for a, b in zip(ours, r["img_per_s_runs"])]
            out[f"paired_speedup_vs_{label.removesuffix('|eager')}"] = round(statistics.median(ratios), 3)
    return out


def cpu_name() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what ``platform`` knows. The ratios depend on it: on an
    AMD EPYC, ornis's oneDNN linear layers ran 1.4-1.8x PyTorch's own, against 1.03-1.10x on an earlier machine."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu: {cpu_name()}",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "repeats": args.repeats,
        "iters": args.iters,
        "archs": {},
    }
    compile_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    for key in args.arch:
        arch = ARCHS[key]
        batch = args.batch or (arch.gpu_batch if device.type == "cuda" else 4)
        x = torch.randn(batch, 3, arch.size, arch.size, device=device)
        net = ornis.build_model(arch.ornis_name, size=arch.size).eval()
        gflops = count_gflops(net, arch.size)
        entry = {"size": arch.size, "batch": batch, "gflops_per_img": round(gflops, 2), "runs": {}}
        built: dict[str, tuple[Callable, torch.nn.Module]] = {"ornis": (net.embedding, net)}
        for ref in () if args.skip_references else arch.references:
            try:
                built[ref] = build_reference(ref, arch.size)
            except Exception as e:  # a reference that is not installed or lacks the model is reported, not fatal
                entry["runs"][ref] = {"error": f"{type(e).__name__}: {e}"[:200]}
        xin = x.to(torch.bfloat16) if args.weights_dtype == "bf16" else x
        for _, module in built.values():
            module.eval().to(device)
            if args.weights_dtype == "bf16":
                module.to(torch.bfloat16)
        for compiled in compile_modes:
            mode = "compiled" if compiled else "eager"
            fns = {label: (torch.compile(fn) if compiled else fn) for label, (fn, _) in built.items()}
            if device.type == "cpu" and not compiled and args.dtype == "fp32":
                fns["ornis-pytorch-layers"] = pytorch_layers(net.embedding)
            try:
                timed = measure_interleaved(fns, xin, args.dtype, args.iters, args.warmup, args.repeats)
            except Exception as e:
                timed = {label: {"error": f"{type(e).__name__}: {e}"[:200]} for label in fns}
            for label, r in timed.items():
                if "img_per_s" in r:
                    r["tflops"] = round(r["img_per_s"] * gflops / 1e3, 2)
                entry["runs"][f"{label}|{mode}"] = r
                print(f"{key:26s} {label + '|' + mode:60s} {r}", file=sys.stderr)
        for label in [k for k in built if k != "ornis"]:
            del built[label]
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if args.fast_path:
            entry["runs"].update(fast_path_runs(net, x, args, arch.size, key))
        refs = [
            v["img_per_s"]
            for k, v in entry["runs"].items()
            if k.endswith("|eager") and not k.startswith("ornis") and "img_per_s" in v
        ]
        for mode in ["eager", "compiled"]:
            ours = entry["runs"].get(f"ornis|{mode}", {}).get("img_per_s")
            best = (
                refs
                if mode != "compiled"
                else [
                    v["img_per_s"]
                    for k, v in entry["runs"].items()
                    if k.endswith("|compiled") and not k.startswith("ornis") and "img_per_s" in v
                ]
            )
            if ours and best:
                entry[f"speedup_vs_best_reference_{mode}"] = round(ours / max(best), 3)
        entry.update(paired_speedups(entry["runs"]))
        pairs = [v for k, v in entry.items() if k.startswith("paired_speedup_vs_")]
        for mode in args.fast_path:
            r = entry["runs"].get(f"ornis|{mode}", {})
            if pairs and "paired_speedup_vs_ornis_fp32_eager" in r:
                # fast / best reference = (fast / ornis fp32) * (ornis fp32 / best reference), each from paired runs
                r["speedup_vs_best_reference_fp32_eager"] = round(
                    r["paired_speedup_vs_ornis_fp32_eager"] * min(pairs), 3
                )
        results["archs"][key] = entry
        del net, built
        gc.collect()
    if args.fast_path and not args.skip_classifier:
        results["classifier_agreement_ornis_shapes_vit_tiny"] = classifier_agreement(args.fast_path)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16" if torch.cuda.is_available() else "fp32")
    p.add_argument(
        "--weights-dtype", choices=["fp32", "bf16"], default="fp32", help="cast weights too (inference in bf16)"
    )
    p.add_argument("--compile", choices=["off", "on", "both"], default="both" if torch.cuda.is_available() else "off")
    p.add_argument("--arch", nargs="+", choices=list(ARCHS), default=list(ARCHS))
    p.add_argument("--batch", type=int, default=None, help="default: the issue's GPU batch, 4 on CPU")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model; the median is reported")
    p.add_argument(
        "--fast-path",
        nargs="*",
        default=[],
        choices=["fp32+compile", "bf16", "bf16+compile", "int8", "int8+compile"],
        help="ornis's inference fast-path modes to time and check against fp32 (CPU)",
    )
    p.add_argument("--skip-references", action="store_true", help="time ornis only")
    p.add_argument("--skip-classifier", action="store_true", help="skip the shipped classifier's top-1 agreement")
    p.add_argument("-o", "--output", help="also write the JSON here")
    args = p.parse_args()
    results = run(args)
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
