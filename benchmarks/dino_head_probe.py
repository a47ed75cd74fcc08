"""Where a DINOv2 run's DINO term loses its signal: the backbone, the head's bottleneck or the prototypes. JSON out.

For each states file of a ``train_quality.py`` DINOv2 run on the digits (``<tag>_s<step>_states.pt``), and for the
same network at random init, on the held-out digits:

- ``embedding_cosine``: mean cosine between different images' backbone embeddings (1: all alike);
- ``bottleneck_cosine``: the same for the head's L2-normalised bottleneck outputs;
- ``logit_std_over_images``: per prototype, the std of its score over the images, averaged (what centring keeps);
- ``logit_std_over_prototypes``: per image, the std of its scores over the prototypes, averaged;
- ``target_entropy`` / ``target_max`` at teacher temperatures 0.04 and 0.07, centred by the run's DINO centre (the
  teacher) or the images' mean (the student, random init). ln K is the entropy of uniform targets.

    python benchmarks/dino_head_probe.py run/dino-v2/vit_t16_dino-v2_s430_states.pt -o probe.json
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from train_quality import SIZE, VIT, write_digits

import ornis
from ornis.train.dino_v2 import HeadConfig
from ornis.train.dino_v2.meta_arch import SelfDistillationNet
from ornis.train.evaluation import KnnMonitor


def mean_offdiagonal_cosine(rows: torch.Tensor) -> float:
    """Mean cosine between different rows."""
    x = F.normalize(rows, dim=-1)
    n = x.shape[0]
    return float(((x @ x.T).sum() - n) / (n * n - n))


@torch.no_grad()
def probe(net: SelfDistillationNet, images: torch.Tensor, center: torch.Tensor | None) -> dict[str, Any]:
    """The numbers of the module docstring for ``net`` on ``images``."""
    net.eval()
    embedding = net.backbone.embedding(images)
    head = net.dino_head
    bottleneck = F.normalize(head.mlp(embedding), dim=-1)
    logits = head.last_layer(bottleneck)
    centre = logits.mean(dim=0, keepdim=True) if center is None else center
    out: dict[str, Any] = {
        "embedding_cosine": mean_offdiagonal_cosine(embedding),
        "bottleneck_cosine": mean_offdiagonal_cosine(bottleneck),
        "logit_std_over_images": float(logits.std(dim=0).mean()),
        "logit_std_over_prototypes": float(logits.std(dim=1).mean()),
    }
    for temp in (0.04, 0.07):
        p = torch.softmax((logits - centre) / temp, dim=-1)
        out[f"target_entropy_t{temp}"] = float(-(p * p.clamp_min(1e-12).log()).sum(dim=-1).mean())
        out[f"target_max_t{temp}"] = float(p.max(dim=-1).values.mean())
    return out


def network(heads: HeadConfig, state: dict[str, torch.Tensor] | None) -> SelfDistillationNet:
    """The digits protocol's backbone with ``heads``, loaded from ``state`` (None: random init)."""
    net = SelfDistillationNet(ornis.build_model("vit_t16", size=SIZE, config=VIT), heads)
    if state is not None:
        net.load_state_dict(state)
    return net


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("states", nargs="+", type=Path, help="states files of DINOv2 runs on the digits protocol")
    p.add_argument("--out-dim", type=int, default=1024)
    p.add_argument("--hidden-dim", type=int, default=512)
    p.add_argument("--seed", type=int, default=0, help="the random-init network's seed")
    p.add_argument("-o", "--output", type=Path)
    args = p.parse_args()
    heads = HeadConfig(out_dim=args.out_dim, hidden_dim=args.hidden_dim)
    with tempfile.TemporaryDirectory() as tmp:
        train, val = write_digits(Path(tmp))
        held_out = KnnMonitor(train, val, (SIZE, SIZE)).sets[1]
        images = torch.stack([held_out[i][0] for i in range(len(held_out))])
    torch.manual_seed(args.seed)
    report: dict[str, Any] = {
        "data": f"the {len(images)} held-out digits at {SIZE} px",
        "ln_k": math.log(args.out_dim),
        "random_init": probe(network(heads, None), images, None),
    }
    for path in args.states:
        states = torch.load(path, map_location="cpu", weights_only=True)
        centre = states["recipe"]["centering"]["dino.center"]
        report[str(path)] = {
            "step": states["step"],
            "teacher": probe(network(heads, states["recipe"]["teacher"]), images, centre),
            "student": probe(network(heads, states["model"]), images, None),
        }
    text = json.dumps(report, indent=1)
    print(text)
    if args.output:
        args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
