"""How the trainable module is spread over processes: DDP under torchrun, or FSDP2 (``fsdp=True``) sharding every
encoder's repeated blocks, for models too big for one GPU's memory (ViT-L and up; CUDA only)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ornis.errors import OrnisError
from ornis.models.base import Encoder
from ornis.train.config import Recipe, TrainConfig
from ornis.utils.distributed import is_distributed


def sharded_blocks(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: every encoder's ``blocks()`` inside ``model`` (the encoder declares
    them; decoders and heads stay in the root's shard)."""
    return [blk for module in model.modules() if isinstance(module, Encoder) for blk in module.blocks()]


def wrap(model: nn.Module, cfg: TrainConfig, device: torch.device, recipe: Recipe) -> nn.Module:
    """``model`` sharded with FSDP (``cfg.fsdp``), in DDP (a process group is up) or as it is."""
    if cfg.fsdp:
        # Imported here: torch builds without distributed support lack the module, and FSDP is CUDA-only anyway
        from torch.distributed.fsdp import fully_shard

        if not is_distributed():
            raise OrnisError("fsdp=True needs a distributed launch (torchrun)")
        for block in sharded_blocks(model):
            fully_shard(block)
        fully_shard(model)
        return model
    if is_distributed():
        ids = [device.index] if device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=recipe.find_unused_parameters)
    return model
