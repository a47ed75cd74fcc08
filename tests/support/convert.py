"""Foreign checkpoints for the converter tests: a tiny DINOv2 torch-hub state and junk files."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_hub_state(width: int = 64, registers: int = 4) -> dict[str, torch.Tensor]:
    """A one-block DINOv2-with-registers state dict in the torch-hub layout (patch 14, a 2x2 grid), random."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.05

    state = {
        "cls_token": r(1, 1, width),
        "register_tokens": r(1, registers, width),
        "pos_embed": r(1, 5, width),
        "mask_token": r(1, width),
        "patch_embed.proj.weight": r(width, 3, 14, 14),
        "patch_embed.proj.bias": r(width),
        "norm.weight": r(width),
        "norm.bias": r(width),
    }
    for leaf, shape in {
        "norm1.weight": (width,),
        "norm1.bias": (width,),
        "attn.qkv.weight": (3 * width, width),
        "attn.qkv.bias": (3 * width,),
        "attn.proj.weight": (width, width),
        "attn.proj.bias": (width,),
        "ls1.gamma": (width,),
        "norm2.weight": (width,),
        "norm2.bias": (width,),
        "mlp.fc1.weight": (4 * width, width),
        "mlp.fc1.bias": (4 * width,),
        "mlp.fc2.weight": (width, 4 * width),
        "mlp.fc2.bias": (width,),
        "ls2.gamma": (width,),
    }.items():
        state[f"blocks.0.{leaf}"] = r(*shape)
    return state


def junk_sources(folder: Path) -> dict[str, Path]:
    """Files a converter must refuse in one line: text, random bytes, a pickle header, a list, partial states."""
    files = {
        "text": b"hello, I am a text file\n" * 4,
        "random": bytes((i * 7919 + 13) % 251 for i in range(4096)),
        "pickle-header": b"\x80\x02" + bytes(range(256)),
    }
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.pt"
        paths[name].write_bytes(data)
    torch.save([1, 2, 3], folder / "list.pt")
    paths["list"] = folder / "list.pt"
    # The right top-level keys with too little behind them: what a converter reads first is there, the rest not
    torch.save(
        {
            "model": {
                "image_encoder.trunk.patch_embed.proj.weight": torch.zeros(8, 3, 7, 7),
                "image_encoder.trunk.pos_embed": torch.zeros(1, 8, 7, 7),
                "image_encoder.trunk.pos_embed_window": torch.zeros(1, 8, 8, 8),
            }
        },
        folder / "trunk.pt",
    )
    paths["partial-sam2"] = folder / "trunk.pt"
    hub = tiny_hub_state()
    del hub["blocks.0.mlp.fc1.weight"]
    torch.save({k: v for k, v in hub.items() if not k.startswith("blocks.")}, folder / "hub.pth")
    paths["partial-dinov2"] = folder / "hub.pth"
    torch.save({**hub, "pos_embed": torch.zeros(5)}, folder / "flat_pos.pth")
    paths["flat-pos-embed"] = folder / "flat_pos.pth"
    return paths
