"""Training recipes over one shared loop: ``supervised`` (fine-tuning / from scratch), ``mim`` (masked image
modelling) and ``dino_v2`` (self-distillation). ``loop.run(recipe, dataset, TrainConfig(...))`` trains any of them.

The package: ``config`` (TrainConfig, Recipe, TrainResult), ``loop`` (run), ``sampling`` (data order, per-step
seeds), ``states`` (states files, resume), ``wrap`` (DDP / FSDP), ``optim`` (parameter groups, schedule, EMA),
``start`` (the encoder a recipe starts from), ``data`` (sources, transforms), and the recipes.
"""

from ornis.data.keys import SampleKey
from ornis.train.config import Recipe, TrainConfig, TrainResult
from ornis.train.loop import run

__all__ = ["Recipe", "SampleKey", "TrainConfig", "TrainResult", "run"]
