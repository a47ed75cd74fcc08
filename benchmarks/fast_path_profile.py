"""Where the CPU fast path spends its time: self CPU time by op (torch.profiler, two batches of 8 after one warm-up)
for fp32 and int8, the bound behind the fast path's speed-up (linear layers quantise, attention and GELU stay fp32).

    python benchmarks/fast_path_profile.py   # writes benchmarks/results/cpu_fast_path_profile.json
"""

import json

import torch

import ornis
from ornis.models.precision import prepare_for_inference

torch.set_num_threads(2)
torch.manual_seed(0)
out = {}
for name, size in (("hiera_abswin_base", 224), ("flexivit_reg1_s16_rms_ls", 240)):
    net = ornis.build_model(name, size=size).eval()
    for mode in ("fp32", "int8"):
        m = prepare_for_inference(net, mode) if mode != "fp32" else net
        x = torch.randn(8, 3, size, size)
        with torch.inference_mode():
            m.embedding(x) if hasattr(m, "embedding") else m(x)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
                for _ in range(2):
                    m.embedding(x) if hasattr(m, "embedding") else m(x)
        rows = sorted(p.key_averages(), key=lambda e: -e.self_cpu_time_total)
        total = sum(e.self_cpu_time_total for e in rows)
        out[f"{name}|{mode}"] = [(e.key, round(100 * e.self_cpu_time_total / total, 1)) for e in rows[:8]]
        print(name, mode, out[f"{name}|{mode}"], flush=True)
json.dump(out, open("benchmarks/results/cpu_fast_path_profile.json", "w"), indent=1)
