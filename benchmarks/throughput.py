"""Inference throughput: ornis against the reference implementations, same process, same inputs.

For each architecture it times ornis and every reference that has the model (birder, timm, transformers, sam2,
hiera-transformer — whichever are installed), eager and compiled, fp32 and bf16 autocast, and prints one JSON
document: images/s, peak GPU memory, achieved TFLOP/s (FLOPs counted once on ornis's model with
torch.utils.flop_counter) and each reference's ratio to ornis. All models get the same random weights' shapes
but their own random values: speed does not depend on the values.

GPU (the issue's setting; batch 256 at the card size, 32 for ViT-L at 518):
    python benchmarks/throughput.py --device cuda --dtype bf16 --compile both -o benchmarks/results/h100.json
CPU (fp32 eager, small batches):
    python benchmarks/throughput.py --device cpu --dtype fp32 --compile off --batch 8 --iters 3
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

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


def measure(fn, x: torch.Tensor, dtype: str, iters: int, warmup: int) -> dict:
    device = x.device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    with torch.inference_mode(), autocast:
        for _ in range(warmup):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(iters):
            fn(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    out = {"img_per_s": round(x.shape[0] * iters / elapsed, 2)}
    if device.type == "cuda":
        out["peak_mem_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    return out


def count_gflops(net: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, size, size)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net.embedding(x)
    return counter.get_total_flops() / 1e9


def run(args: argparse.Namespace) -> dict:
    device = torch.device(args.device)
    results = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
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
        candidates: list[tuple[str, Callable]] = [("ornis", lambda net=net: (net.embedding, net))]
        candidates += [(ref, (lambda r=ref, size=arch.size: build_reference(r, size))) for ref in arch.references]
        for label, make in candidates:
            try:
                fn, module = make()
            except Exception as e:  # a reference that is not installed or lacks the model is reported, not fatal
                entry["runs"][label] = {"error": f"{type(e).__name__}: {e}"[:200]}
                continue
            module.eval().to(device)
            if args.weights_dtype == "bf16":
                module.to(torch.bfloat16)
            for compiled in compile_modes:
                run_fn = torch.compile(fn) if compiled else fn
                tag = f"{label}|{'compiled' if compiled else 'eager'}"
                try:
                    r = measure(
                        run_fn,
                        x.to(torch.bfloat16) if args.weights_dtype == "bf16" else x,
                        args.dtype,
                        args.iters,
                        args.warmup,
                    )
                    r["tflops"] = round(r["img_per_s"] * gflops / 1e3, 2)
                except Exception as e:
                    r = {"error": f"{type(e).__name__}: {e}"[:200]}
                entry["runs"][tag] = r
                print(f"{key:26s} {tag:60s} {r}", file=sys.stderr)
            del module, fn
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for mode in ("eager", "compiled"):
            ours = entry["runs"].get(f"ornis|{mode}", {}).get("img_per_s")
            refs = [
                v["img_per_s"]
                for k, v in entry["runs"].items()
                if k.endswith(mode) and not k.startswith("ornis") and "img_per_s" in v
            ]
            if ours and refs:
                entry[f"speedup_vs_best_reference_{mode}"] = round(ours / max(refs), 3)
        results["archs"][key] = entry
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
