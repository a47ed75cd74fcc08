"""Where the CPU fast path spends its time: self CPU time by op (torch.profiler, two batches of 8 after one warm-up)
for fp32 and int8, the bound behind the fast path's speed-up (linear layers quantise, attention and GELU stay fp32).

    python benchmarks/fast_path_profile.py   # all four, to benchmarks/results/cpu_fast_path_profile.json
    python benchmarks/fast_path_profile.py --arch hieradet_small -o /tmp/profile.json
"""

import argparse
import json

import torch

import ornis
from ornis.models.precision import prepare_for_inference

SIZES = {"hieradet_small": 224, "hieradet_d_small": 224, "hiera_abswin_base": 224, "flexivit_reg1_s16_rms_ls": 240}

p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
p.add_argument("--arch", nargs="+", choices=list(SIZES), default=list(SIZES))
p.add_argument("-o", "--output", default="benchmarks/results/cpu_fast_path_profile.json")
args = p.parse_args()
torch.set_num_threads(2)
torch.manual_seed(0)
out = {}
for name in args.arch:
    size = SIZES[name]
    net = ornis.build_model(name, size=size).eval()
    for mode in ("fp32", "int8"):
        m = prepare_for_inference(net, mode) if mode != "fp32" else net
        x = torch.randn(8, 3, size, size)
        with torch.inference_mode():
            m.embedding(x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(2):
                    m.embedding(x)
        rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in rows)
        out[f"{name}|{mode}"] = [(e.key, round(100 * e.self_cpu_time_total / total, 1)) for e in rows[:8]]
        out[f"{name}|{mode}|total_ms_per_batch"] = round(total / 2 / 1000, 1)
        print(name, mode, out[f"{name}|{mode}"], flush=True)
with open(args.output, "w") as f:
    json.dump(out, f, indent=1)
