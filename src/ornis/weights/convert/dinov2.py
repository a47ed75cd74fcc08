"""DINOv2 with registers (Oquab et al. 2024; Darcet et al. 2024) -> ``vit_reg<R>_<size><patch>_nps_ls`` checkpoints.

Two source layouts are read:

- the official torch-hub state dict (``dinov2_vitl14_reg4_pretrain.pth``): ``cls_token``, ``register_tokens``,
  ``pos_embed``, ``mask_token``, ``patch_embed.proj.*``, ``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
  mlp.fc1, mlp.fc2, ls2.gamma}``, ``norm.*``;
- a Hugging Face ``Dinov2WithRegisters`` folder (``config.json`` + ``model.safetensors``), whose on-disk keys are
  ``embeddings.*``, ``encoder.layer.N.attention.attention.{query,key,value}``, ``attention.output.dense``,
  ``layer_scale1.lambda1``, ``mlp.fc1``... and ``layernorm.*``. It is first rewritten into the torch-hub layout.

Two facts make the conversion exact. DINOv2 stores a position embedding for the class token and adds it before the
registers are inserted, so the registers get none; in an "nps" model (no position embedding on special tokens) the
class token's row is folded into the token itself, which gives the same sum. And attention is blind to token order,
so DINOv2's [class, registers, patches] and ornis's [registers, class, patches] give the same outputs per token.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from ornis.errors import CheckpointFormatError
from ornis.weights.checkpoint import check_destination
from ornis.weights.convert.common import (
    IMAGENET_RGB_STATS,
    config_overrides,
    foreign_layout,
    read_tensors,
    write_converted,
)

HEAD_DIM = 64  # every DINOv2 release (S/B/L/g) uses 64-channel heads; the hub state dict does not record heads
SIZE_NAMES = {384: "s", 768: "b", 1024: "l"}
REGISTERED_REGISTERS = (0, 1, 4)


def convert_dinov2(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    num_heads: int | None = None,
    layer_norm_eps: float | None = None,
) -> Path:
    """Convert a DINOv2-with-registers checkpoint (a torch-hub ``.pth`` / ``.safetensors`` state dict, or a Hugging
    Face folder) into ``dst`` in the published format; ``ornis.load_pretrained_model(dst)`` loads it.

    ``num_heads`` is needed only for a torch-hub file whose width is not 64 x heads; a Hugging Face folder's
    ``config.json`` says it.
    """
    src = Path(src)
    check_destination(dst)
    if num_heads is not None and (isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1):
        raise ValueError(f"num_heads must be a positive integer, found {num_heads!r}")
    if not src.exists():
        raise CheckpointFormatError(src, "no such file or folder")
    with foreign_layout(src, "DINOv2 checkpoint"):
        hub_state, facts = read_dinov2(src)
        if num_heads is not None:
            facts["num_heads"] = num_heads
        if layer_norm_eps is not None:
            facts["norm_eps"] = layer_norm_eps
        state, network, size, overrides = hub_to_ornis(hub_state, facts, path=src)
    return write_converted(
        state, dst, network=network, size=size, rgb_stats=IMAGENET_RGB_STATS, config=overrides, source=src
    )


def read_dinov2(src: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The torch-hub-layout state dict of ``src`` and the architecture facts its files state (heads, eps)."""
    if src.is_dir():
        return read_hf_folder(src)
    obj = read_tensors(src)
    if isinstance(obj, dict) and "model" in obj and isinstance(obj["model"], dict):
        obj = obj["model"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointFormatError(src, "expected a state dict (names -> tensors)")
    if any(k.startswith("embeddings.") for k in obj):
        return hf_to_hub(obj, path=src), {}
    return dict(obj), {}


def read_hf_folder(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """A Hugging Face ``Dinov2WithRegisters`` folder's state dict in the torch-hub layout, and the architecture
    facts its ``config.json`` states (heads, eps, qkv bias)."""
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise CheckpointFormatError(folder, "a Hugging Face model folder needs config.json; none found")
    config = json.loads(config_path.read_text())
    if config.get("use_swiglu_ffn"):
        raise CheckpointFormatError(config_path, "SwiGLU feed-forward (DINOv2 giant) has no ornis architecture")
    if config.get("hidden_act", "gelu") != "gelu":
        raise CheckpointFormatError(config_path, f"expected hidden_act 'gelu', found {config['hidden_act']!r}")
    state: dict[str, torch.Tensor] = {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(read_tensors(folder / shard))
    elif (folder / "model.safetensors").is_file():
        state = read_tensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        state = read_tensors(folder / "pytorch_model.bin")
    else:
        raise CheckpointFormatError(
            folder, "found no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    facts = {"num_heads": int(config["num_attention_heads"]), "norm_eps": float(config.get("layer_norm_eps", 1e-6))}
    if not config.get("qkv_bias", True):
        facts["qkv_bias"] = False
    return hf_to_hub(state, path=folder), facts


# Hugging Face names (on disk, and transformers 5's in-memory names) -> torch-hub names, per encoder layer
_HF_LAYER_NAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "layer_scale1.lambda1": "ls1.gamma",
    "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "q": ("attention.attention.query", "attention.q_proj"),
    "k": ("attention.attention.key", "attention.k_proj"),
    "v": ("attention.attention.value", "attention.v_proj"),
}


def hf_to_hub(state: dict[str, torch.Tensor], path: Path | None = None) -> dict[str, torch.Tensor]:
    """Rewrite a Hugging Face ``Dinov2WithRegisters`` state dict in the official torch-hub layout (q, k, v fused)."""
    state = {k.removeprefix("dinov2."): v for k, v in state.items()}  # *ForImageClassification nests the model
    out: dict[str, torch.Tensor] = {}
    fixed = {
        "embeddings.cls_token": "cls_token",
        "embeddings.register_tokens": "register_tokens",
        "embeddings.mask_token": "mask_token",
        "embeddings.position_embeddings": "pos_embed",
        "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
        "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
        "layernorm.weight": "norm.weight",
        "layernorm.bias": "norm.bias",
    }
    used = set()
    for hf, hub in fixed.items():
        if hf in state:
            out[hub] = state[hf]
            used.add(hf)
    layers = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.layer\.(\d+)\.", k))})
    for i in layers:
        pre = f"encoder.layer.{i}."
        for hf, hub in _HF_LAYER_NAMES.items():
            for leaf in ("weight", "bias", ""):
                key = f"{pre}{hf}.{leaf}" if leaf else f"{pre}{hf}"
                if key in state:
                    out[f"blocks.{i}.{hub}.{leaf}" if leaf else f"blocks.{i}.{hub}"] = state[key]
                    used.add(key)
        for leaf in ("weight", "bias"):
            parts = []
            for names in _HF_QKV.values():
                key = next((f"{pre}{n}.{leaf}" for n in names if f"{pre}{n}.{leaf}" in state), None)
                if key is not None:
                    parts.append(state[key])
                    used.add(key)
            if len(parts) == 3:
                out[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat(parts, dim=0)
            elif parts:
                raise CheckpointFormatError(path, f"layer {i}: found {len(parts)} of the query/key/value {leaf}s")
    unused = sorted(set(state) - used)
    if unused:
        raise CheckpointFormatError(
            path, f"{len(unused)} Hugging Face key(s) have no torch-hub counterpart: {', '.join(unused[:8])}"
        )
    return out


def hub_to_ornis(
    state: dict[str, torch.Tensor], facts: dict[str, Any] | None = None, path: Path | None = None
) -> tuple[dict[str, torch.Tensor], str, tuple[int, int], dict[str, Any]]:
    """Map a torch-hub DINOv2 state dict to ornis's ViT keys. Returns (state, network, input size, config
    overrides for that network)."""
    facts = dict(facts or {})
    required = ("cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight")
    missing = [k for k in required if k not in state]
    if missing:
        found = ", ".join(list(state)[:8])
        raise CheckpointFormatError(path, f"not a DINOv2 state dict: missing {', '.join(missing)} (found {found}, ...)")
    if any(".mlp.w12." in k for k in state):
        raise CheckpointFormatError(path, "SwiGLU feed-forward (DINOv2 giant) has no ornis architecture")
    if any(re.match(r"blocks\.\d+\.\d+\.", k) for k in state):
        raise CheckpointFormatError(path, "chunked blocks (blocks.C.N.*, a training checkpoint) are not supported")

    hidden = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    num_layers = 1 + max(int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)))
    mlp_dim = state["blocks.0.mlp.fc1.weight"].shape[0]
    registers = state.get("register_tokens", None)
    num_reg = 0 if registers is None else registers.shape[1]
    pos = state["pos_embed"]
    patch_rows = pos.shape[1] - 1
    side = math.isqrt(patch_rows)
    if side * side != patch_rows:
        raise CheckpointFormatError(path, f"pos_embed has {patch_rows} patch rows, expected a square grid")
    num_heads = int(facts.pop("num_heads", hidden // HEAD_DIM or 1))
    if hidden % num_heads:
        raise CheckpointFormatError(path, f"width {hidden} is not divisible by {num_heads} heads; pass num_heads")

    out: dict[str, torch.Tensor] = {
        "class_token": state["cls_token"] + pos[:, :1],  # DINOv2's class position embedding, folded in
        "pos_embedding": pos[:, 1:],
        "conv_proj.weight": state["patch_embed.proj.weight"],
        "conv_proj.bias": state["patch_embed.proj.bias"],
        "norm.weight": state["norm.weight"],
        "norm.bias": state["norm.bias"],
    }
    if registers is not None:
        out["reg_tokens"] = registers
    names = {
        "norm1": "norm1",
        "attn.qkv": "attn.qkv",
        "attn.proj": "attn.proj",
        "ls1.gamma": "layer_scale_1.gamma",
        "norm2": "norm2",
        "mlp.fc1": "mlp.0",
        "mlp.fc2": "mlp.3",
        "ls2.gamma": "layer_scale_2.gamma",
    }
    # mask_token (iBOT's masked-patch token) is a training-time parameter: dropped
    used = {"cls_token", "pos_embed", "register_tokens", "mask_token", "norm.weight", "norm.bias"}
    used |= {"patch_embed.proj.weight", "patch_embed.proj.bias"}
    for i in range(num_layers):
        for hub, ours in names.items():
            for leaf in ("weight", "bias") if not hub.endswith("gamma") else ("",):
                key = f"blocks.{i}.{hub}.{leaf}" if leaf else f"blocks.{i}.{hub}"
                if key in state:
                    out[f"encoder.block.{i}.{ours}.{leaf}" if leaf else f"encoder.block.{i}.{ours}"] = state[key]
                    used.add(key)
    unused = sorted(set(state) - used)
    if unused:
        raise CheckpointFormatError(path, f"{len(unused)} key(s) have no ornis counterpart: {', '.join(unused[:8])}")

    size_name = SIZE_NAMES.get(hidden, "s")
    reg_name = num_reg if num_reg in REGISTERED_REGISTERS else 4
    network = f"vit_{f'reg{reg_name}_' if reg_name else ''}{size_name}{patch if patch in (14, 16) else 14}_nps_ls"
    wanted = {
        "patch_size": patch,
        "num_layers": num_layers,
        "num_heads": num_heads,
        "hidden_dim": hidden,
        "mlp_dim": mlp_dim,
        "num_reg_tokens": num_reg,
        "norm_eps": float(facts.pop("norm_eps", 1e-6)),
        "qkv_bias": bool(facts.pop("qkv_bias", "blocks.0.attn.qkv.bias" in state)),
    }
    return out, network, (side * patch, side * patch), config_overrides(network, wanted)
