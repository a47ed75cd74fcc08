"""``ornis train classify``: learning, exact resume, fine-tuning a checkpoint, shards, the CLI, top-k validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.training import STATS, TINY_VIT, make_shapes, write_digits, write_shards

import ornis
from ornis.train.config import TrainConfig
from ornis.train.data import SampleDataset, eval_transform, open_source, train_transform
from ornis.train.loop import run
from ornis.train.supervised import ClassifyOptions, ClassifyRecipe, evaluate_topk, train_classifier

CLASSES = {"circle": 0, "square": 1, "triangle": 2}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cls")
    return make_shapes(root / "train", per_class=12, seed=0), make_shapes(root / "val", per_class=6, seed=1)


def test_loss_goes_down_and_validation_top1(tmp_path, data):
    train, val = data
    opts = ClassifyOptions(
        train=train,
        val=val,
        arch="vit_t16",
        size=32,
        model_config=TINY_VIT,
        auto_augment=None,
        crop_scale=(0.5, 1.0),
        label_smoothing=0.0,
    )
    cfg = TrainConfig(steps=25, batch_size=12, lr=3e-3, warmup_steps=3, output_dir=tmp_path, log_every=5, seed=0)
    result, metrics = train_classifier(opts, cfg)
    losses = [result.losses[s] for s in range(25)]
    assert losses[0] == pytest.approx(1.0986, abs=0.1)  # a small random head (std 0.02): near ln(3); 1.035
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0], losses  # measured: ~0.1 after 25 steps
    assert metrics is not None and metrics["top1"] >= 0.8 and metrics["top5"] == 1.0, metrics
    assert json.loads((tmp_path / "val_metrics.json").read_text()) == metrics
    # acceptance 5: the checkpoint loads by path and embeds images
    net, info = ornis.load_pretrained_model(result.checkpoint, inference=True)
    assert info.class_to_idx == CLASSES and net.name == "vit_t16" and info.custom_config == TINY_VIT
    transform = ornis.classification_transform(32, info.rgb_stats)
    from ornis.inference.classification import infer_image

    out, emb = infer_image(net, next((val / "circle").glob("*.png")), transform, return_embedding=True)
    assert out.shape == (1, 3) and emb.shape == (1, 64)
    # the reloaded model gives the same top-1 as the trained one
    val_ds = SampleDataset(open_source(val, labelled=True, class_to_idx=CLASSES), eval_transform(32, info.rgb_stats))
    assert evaluate_topk(net, val_ds)["top1"] == pytest.approx(metrics["top1"])


def _recipe(classes: dict[str, int], seed: int) -> ClassifyRecipe:
    from ornis.models import build_model

    torch.manual_seed(seed)
    net = build_model("vit_t16", num_classes=3, size=32, config={**TINY_VIT, "num_layers": 1, "drop_path_rate": 0.1})
    return ClassifyRecipe(net, classes, STATS, mixup_alpha=0.8, cutmix_alpha=1.0, label_smoothing=0.1)


def test_resume_gives_the_same_losses(tmp_path, data):
    """Stop after step 3 and resume: steps 4.. equal an uninterrupted run exactly, with every random part on
    (RandAugment, mixup/cutmix, drop-path, EMA, gradient accumulation)."""
    source = open_source(data[0], labelled=True)
    ds = SampleDataset(source, train_transform(32, STATS, scale=(0.5, 1.0), auto_augment="randaugment"))
    kw = dict(steps=7, batch_size=8, lr=3e-3, warmup_steps=2, grad_accum=2, ema_decay=0.9, log_every=0)
    full = run(_recipe(CLASSES, 0), ds, TrainConfig(output_dir=tmp_path / "a", **kw))
    run(_recipe(CLASSES, 0), ds, TrainConfig(output_dir=tmp_path / "b", stop_at=3, **kw))
    rest = run(_recipe(CLASSES, 1), ds, TrainConfig(output_dir=tmp_path / "b", resume=True, **kw))
    assert sorted(rest.losses) == list(range(3, 7))
    assert max(abs(rest.losses[s] - full.losses[s]) for s in rest.losses) <= 1e-6
    a = ornis.read_checkpoint(tmp_path / "a" / "vit_t16_classify.pt").state
    b = ornis.read_checkpoint(tmp_path / "b" / "vit_t16_classify.pt").state
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6


def test_fine_tune_a_checkpoint_on_new_classes_from_shards(tmp_path, data):
    """Start from a published-format file with 5 classes; the head is reset to the shards' 3 classes and the
    backbone starts from the file's weights."""
    from ornis.models import build_model

    torch.manual_seed(0)
    pre = build_model("vit_t16", num_classes=5, size=32, config=TINY_VIT)
    with torch.no_grad():
        for p in pre.parameters():
            p.normal_(0, 0.05)
    start = ornis.save_model(
        pre, tmp_path / "pretrained.pt", class_to_idx={f"old{i}": i for i in range(5)}, rgb_stats=STATS, config=TINY_VIT
    )
    shards = write_shards(tmp_path, data[0], shards=2)
    opts = ClassifyOptions(train=[str(s) for s in shards], weights=start, auto_augment=None, label_smoothing=0.0)
    result, metrics = train_classifier(
        opts, TrainConfig(steps=2, batch_size=6, lr=1e-4, output_dir=tmp_path / "out", log_every=0)
    )
    assert metrics is None
    net, info = ornis.load_pretrained_model(result.checkpoint)
    assert (
        net.num_classes == 3
        and info.class_to_idx == {"0": 0, "1": 1, "2": 2}
        and info.rgb_stats == {k: list(v) for k, v in STATS.items()}
    )
    old = pre.state_dict()
    new = net.state_dict()
    drift = max(float((old[k] - new[k]).abs().max()) for k in old if not k.startswith("classifier"))
    assert 0 < drift < 0.01  # trained from the file's weights (2 steps of lr 1e-4), not from a fresh init
    assert result.losses[0] == pytest.approx(1.0986, abs=0.1)  # a new small random head, not the file's 5-class one
    assert float(new["classifier.weight"].std()) == pytest.approx(0.02, rel=0.2)  # std 0.02 + 2 steps of lr 1e-4


def test_cli_train_classify(tmp_path, data):
    from ornis.cli.main import main

    train, val = data
    options = (
        "--arch vit_t16 --size 32 --steps 3 --batch-size 6 --workers 0 --mixup 0.2 --cutmix 1.0 --aug trivialaugment"
    )
    more = "--checkpoint-every 2 --log-every 1 --device cpu"
    code = main(
        ["train", "classify", str(train), "--val", str(val), *options.split(), *more.split()]
        + ["--model-config", json.dumps(TINY_VIT), "-o", str(tmp_path)]
    )
    assert code == 0
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == [
        "log.jsonl",
        "val_metrics.json",
        "vit_t16_classify.pt",
        "vit_t16_classify_best.pt",  # validated at the end: the best top-1 so far is kept
        "vit_t16_classify_s2.pt",
        "vit_t16_classify_s2_states.pt",
        "vit_t16_classify_s3.pt",
        "vit_t16_classify_s3_states.pt",
    ]
    assert len((tmp_path / "log.jsonl").read_text().splitlines()) == 3
    metrics = json.loads((tmp_path / "val_metrics.json").read_text())
    assert 0.0 <= metrics["top1"] <= metrics["top5"] == 1.0  # 3 classes: top-5 counts all of them


@pytest.mark.slow
def test_a_vit_from_scratch_learns_real_digits(tmp_path):
    """A 4-block ViT from scratch on 600 scanned digits (16 px, patch 2), lr 3e-3 warmed up over the recipe's 10%,
    no flips. Measured, 1 thread: top-1 0.782 on the 1,197 held out; 0.578 with the old zero-initialised head (2
    blocks at lr 1e-3: 0.475 against 0.291)."""
    train, val = write_digits(tmp_path / "digits", train_count=600, size=16)
    opts = ClassifyOptions(
        train=train,
        val=val,
        arch="vit_t16",
        size=16,
        model_config=dict(TINY_VIT, patch_size=2, num_layers=4),
        auto_augment=None,
        crop_scale=(0.8, 1.0),
        hflip=False,
    )
    cfg = TrainConfig(steps=400, batch_size=32, lr=3e-3, output_dir=tmp_path / "run", seed=0)
    _, metrics = train_classifier(opts, cfg)
    assert metrics is not None and metrics["top1"] >= 0.7, metrics
