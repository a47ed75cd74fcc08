"""Parity figures of the five published architectures against Birder 0.8.4, random weights in the published file
format, on real photos shipped with scikit-image. Prints JSON: per model, the largest absolute and relative error of
the embedding and the logits (ornis fp32 eager against the reference fp32 eager, same process, same inputs).

    python benchmarks/parity.py [--skip-large] [-o benchmarks/results/parity.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from birder.model_registry import registry
from PIL import Image
from skimage import data

import ornis
from ornis.weights.manifest import get_weights

MODELS = {  # published name -> card input size
    "flexivit_reg1_s16_rms_ls_dino-v2-il-all": 240,
    "hieradet_d_small_dino-v2": 224,
    "hieradet_small_sam2_1": 224,
    "hiera_abswin_base_mim": 224,
    "vit_reg4_l14_nps_ls_dino-v2-lvd142m": 518,
}
RGB_STATS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def photos(size: int) -> torch.Tensor:
    images = [Image.fromarray(getattr(data, n)()).convert("RGB") for n in ("astronaut", "coffee", "chelsea")]
    transform = ornis.classification_transform((size, size), RGB_STATS)
    return torch.stack([transform(img) for img in images])


def reference_file(network: str, size: int, num_classes: int, path: Path) -> torch.nn.Module:
    torch.manual_seed(0)
    net = registry.net_factory(network, num_classes, 3, size=(size, size))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.02)
    torch.save(
        {
            "state": net.state_dict(),
            "birder_version": "0.8.4",
            "task": "image_classification",
            "signature": {
                "inputs": [{"data_shape": [0, 3, size, size]}],
                "outputs": [{"data_shape": [0, num_classes]}],
            },
            "class_to_idx": {str(i): i for i in range(num_classes)},
            "rgb_stats": RGB_STATS,
        },
        path,
    )
    return net.eval()


def errors(ours: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    diff = (ours.double() - ref.double()).abs().max().item()
    return {"max_abs": diff, "max_rel": diff / max(ref.double().abs().max().item(), 1e-12)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-large", action="store_true", help="leave out ViT-L/14 at 518 px (slow on a CPU)")
    parser.add_argument("-o", "--output", help="also write the JSON here")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    result: dict[str, object] = {"reference": "birder 0.8.4", "torch": torch.__version__, "models": {}}
    for name, size in MODELS.items():
        if args.skip_large and size > 300:
            continue
        weights = get_weights(name)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{weights.network}_parity.pt"
            ref = reference_file(weights.network, size, weights.num_classes, path)
            net, _ = ornis.load_pretrained_model(path, inference=True)
        x = photos(size)
        ref_emb, ours_emb = ref.embedding(x), net.embedding(x)
        entry = {"size": size, "embedding": errors(ours_emb, ref_emb)}
        if weights.num_classes:
            entry["logits"] = errors(net.classify(ours_emb), ref.classify(ref_emb))
        result["models"][name] = entry  # type: ignore[index]
        print(name, json.dumps(entry), file=sys.stderr)
    text = json.dumps(result, indent=2)
    print(text)
    if args.output:
        Path(args.output).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    sys.exit(main())
