"""A run that collapses says so: the loop warns when the best metric falls far below its best (and keeps
``<tag>_best.pt``), DINOv2 warns when its KoLeo term climbs (class tokens crowding). The numbers fed in are the
logged values of the real runs on the digits (README, ``benchmarks/results/train_quality_dino_long_*``)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from support.training import STATS, TINY_VIT, dino_recipe, make_shapes

from ornis.cli.main import main
from ornis.models import build_model
from ornis.train.config import TrainConfig
from ornis.train.data import SampleDataset, open_source, train_transform
from ornis.train.dino_v2 import DinoV2Recipe
from ornis.train.loop import run
from ornis.train.mim import MIMRecipe
from ornis.train.monitor import fell_from_best
from ornis.train.supervised import ClassifyRecipe

# Logged KoLeo (summed over the two global views) of the three long DINOv2 runs
COLLAPSED = (0.50, 0.27, 1.71, 2.08)  # defaults scaled to 2,150 steps: k-NN 0.594 -> 0.186 between the 2nd and 3rd
HALF_LR = (0.53, 0.20, 0.18, 0.06, -0.02, -0.09, -0.21, -0.21, -0.24, -0.25)  # --lr 3.5e-4: no collapse
FAST_TEACHER = (1.449, 0.654, 0.689, 0.400, 0.352, 0.339, 0.266, 0.135, 0.050, 0.112)  # momentum 0.96, seed 1


def crowding_warnings(koleo: tuple[float, ...], caplog: pytest.LogCaptureFixture) -> list[str]:
    recipe = dino_recipe()
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ornis.train"):
        for i, value in enumerate(koleo):
            recipe.on_log({"koleo": value}, step=215 * (i + 1) - 1)
    return [r.getMessage() for r in caplog.records if "KoLeo" in r.getMessage()]


def test_a_climbing_koleo_term_warns_once_and_healthy_runs_do_not(caplog: pytest.LogCaptureFixture) -> None:
    (message,) = crowding_warnings(COLLAPSED, caplog)
    # per view: 0.27 / 2 = 0.135 -> 1.71 / 2 = 0.855, nearest neighbours e^0.72 = 2.1x closer
    assert message.startswith("step 645: the KoLeo term per view rose from 0.135 to 0.855")
    assert "2.1x closer" in message and "--lr" in message
    assert crowding_warnings(HALF_LR, caplog) == []
    assert crowding_warnings(FAST_TEACHER, caplog) == []
    assert crowding_warnings((float("nan"), 0.3, float("nan")), caplog) == []


def test_fell_from_best() -> None:
    assert fell_from_best(0.186, 0.594)  # the collapsed run's k-NN
    assert not fell_from_best(0.564, 0.597)  # the half-lr run's lowest after its best
    assert not fell_from_best(0.1, float("-inf")) and not fell_from_best(0.0, 0.0)
    assert not fell_from_best(0.11, 0.15)  # near chance (10 classes): a wobble of 0.04 is not a collapse


def test_self_supervised_recipes_keep_their_best_knn() -> None:
    assert DinoV2Recipe.best_metric == MIMRecipe.best_metric == "knn_top1"


class Scripted(ClassifyRecipe):
    """A classifier whose evaluations return ``scores`` in turn."""

    def __init__(self, scores: list[float], *args: Any) -> None:
        super().__init__(*args)
        self.scores = scores

    def evaluate(self, device: torch.device) -> dict[str, float]:
        return {"val_top1": self.scores.pop(0)}


def test_the_loop_warns_once_when_its_metric_falls_and_keeps_the_best(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    shapes = make_shapes(tmp_path / "shapes", per_class=4, size=32)
    data = SampleDataset(open_source(shapes, labelled=True), train_transform(32, STATS, scale=(0.5, 1.0)))
    torch.manual_seed(0)
    net = build_model("vit_t16", num_classes=3, size=32, config=TINY_VIT)
    recipe = Scripted([0.60, 0.62, 0.40, 0.30], net, {"circle": 0, "square": 1, "triangle": 2}, STATS)
    cfg = TrainConfig(steps=4, batch_size=6, lr=1e-3, log_every=0, eval_every=1, num_workers=0, output_dir=tmp_path)
    with caplog.at_level(logging.WARNING, logger="ornis.train"):
        result = run(recipe, data, cfg)
    falls = [r.getMessage() for r in caplog.records if "fell below" in r.getMessage()]
    assert falls == [
        "step 3: val_top1 0.4000 fell below 80% of its best 0.6200: the run is collapsing or diverging (a lower --lr "
        "usually prevents it); vit_t16_classify_best.pt keeps the best weights"
    ]
    assert result.best == tmp_path / "vit_t16_classify_best.pt" and result.best.is_file()


def test_mim_with_eval_knn_keeps_and_names_its_best(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shapes = make_shapes(tmp_path / "shapes", per_class=3, size=32)
    argv = ["train", "mim", str(shapes), "--arch", "vit_t16", "--size", "32", "--model-config", json.dumps(TINY_VIT)]
    argv += ["--steps", "2", "--batch-size", "3", "--workers", "0", "--eval-knn", str(shapes), str(shapes)]
    assert main([*argv, "--eval-every", "1", "-o", str(tmp_path / "run")]) == 0
    best = tmp_path / "run" / "vit_t16_mim_best.pt"
    assert f"best model: {best}" in capsys.readouterr().out.splitlines() and best.is_file()
