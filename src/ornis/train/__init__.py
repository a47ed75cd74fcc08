"""Training recipes over one shared loop: ``supervised`` (fine-tuning / from scratch), ``mim`` (masked image
modelling) and ``dino_v2`` (self-distillation). ``loop.run(recipe, dataset, TrainConfig(...))`` trains any of them."""

from ornis.train.loop import Recipe, SampleKey, TrainConfig, TrainResult, run

__all__ = ["Recipe", "SampleKey", "TrainConfig", "TrainResult", "run"]
