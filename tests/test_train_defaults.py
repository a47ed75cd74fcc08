"""The recipes' published defaults, scaled to the run (issue 14): DINOv2's schedules, freeze, groups and clipping,
centring that works at small batches, collapse diagnostics; MAE's optimiser and decoder; logs without duplicates
after a resume, periodic k-NN, TensorBoard."""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

import pytest
import torch
from support.training import HEADS, dino_dataset, dino_recipe, make_shapes, stripes

from ornis.cli.main import main
from ornis.train.config import TrainConfig
from ornis.train.dino_v2 import DinoV2Recipe
from ornis.train.dino_v2.centering import view_correlation
from ornis.train.dino_v2.watch import CollapseWatch
from ornis.train.loop import run
from ornis.train.mim import MIMOptions, MIMRecipe
from ornis.train.optim import cosine_schedule

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("unlabelled")
    for i, img in enumerate(stripes(16)):
        img.save(root / f"img{i:02d}.png")
    return root


def test_dino_v2_defaults_are_the_published_recipe_scaled_to_the_run() -> None:
    cfg = TrainConfig(steps=430, batch_size=32).resolve(DinoV2Recipe.optim_defaults)
    assert cfg.lr == pytest.approx(4e-3 * math.sqrt(32 / 1024))  # 7.07e-4
    assert cfg.warmup_steps == 43 and cfg.weight_decay == 0.04 and cfg.weight_decay_end == 0.4
    assert cfg.grad_clip == 3.0 and cfg.clip_per_module is True and cfg.betas == (0.9, 0.999)
    # what the user sets wins; a weight decay given alone is constant
    mine = TrainConfig(steps=10, batch_size=32, lr=1e-3, weight_decay=0.1, grad_clip=0.0)
    mine = mine.resolve(DinoV2Recipe.optim_defaults)
    assert (mine.lr, mine.weight_decay, mine.weight_decay_end, mine.grad_clip) == (1e-3, 0.1, None, 0.0)
    assert cosine_schedule(0, 430, 0.04, 0.4) == pytest.approx(0.04) and cosine_schedule(
        429, 430, 0.04, 0.4
    ) == pytest.approx(0.4)

    recipe = dino_recipe()
    assert recipe.config.centering == "softmax"
    recipe.steps_per_epoch = 7
    recipe.setup(TrainConfig(steps=100, batch_size=8).resolve(recipe.optim_defaults), torch.device("cpu"))
    assert recipe.freeze_steps == 7 and recipe.temp_warmup_steps == 30  # one epoch; 30 % of the steps
    groups = recipe.param_groups(TrainConfig(steps=100, batch_size=8).resolve(recipe.optim_defaults))
    by_name = {n: g for g in groups for n in g["names"]}
    assert by_name["dino_head.last_layer.weight_v"]["frozen_until"] == 7
    assert by_name["backbone.conv_proj.weight"]["lr_scale"] == pytest.approx(0.2)
    assert by_name["backbone.pos_embedding"]["wd_scale"] == 1.0  # DINOv2 decays position embeddings
    assert by_name["backbone.norm.weight"]["wd_scale"] == 0.0


def test_mim_defaults_are_mae(tmp_path: Path) -> None:
    cfg = TrainConfig(steps=800, batch_size=32).resolve(MIMRecipe.optim_defaults)
    assert cfg.lr == pytest.approx(1.5e-4 * 32 / 256) and cfg.betas == (0.9, 0.95)
    assert cfg.warmup_steps == 40 and cfg.grad_clip == 0.0 and cfg.weight_decay == 0.05
    opts = MIMOptions(train=tmp_path)
    assert (opts.decoder_dim, opts.decoder_depth, opts.decoder_heads) == (512, 8, 16)
    code = main(["train", "mim", str(tmp_path), "--arch", "vit_t16", "--steps", "1", "-o", str(tmp_path), "--help"])
    assert code == 0


def _prototype_updates(image_folder: Path, freeze: int, steps: int) -> list[float]:
    """Norm of each step's change of the student's prototype weights (v), over ``steps`` steps."""
    recipe = dino_recipe(freeze_last_layer_steps=freeze)
    seen = [recipe.model.dino_head.last_layer.weight_v.detach().clone()]
    after = recipe.after_step

    def record(step: int) -> None:
        after(step)
        seen.append(recipe.model.dino_head.last_layer.weight_v.detach().clone())

    recipe.after_step = record
    cfg = TrainConfig(steps=steps, batch_size=8, lr=2e-3, warmup_steps=0, grad_clip=0.0, log_every=0, num_workers=0)
    run(recipe, dino_dataset(image_folder), cfg)
    return [float((b - a).norm()) for a, b in zip(seen, seen[1:])]


def test_prototype_updates_after_the_freeze_are_normal(image_folder: Path) -> None:
    """Acceptance 4: the freeze is lr 0 for the prototypes' group (AdamW's moments see the real gradients), so the
    first updates after it are within 1.2x of a run that never froze; the old ``w.detach() + 0 * w`` freeze fed
    AdamW zero gradients and the first updates came out several times too large."""
    freeze, steps = 6, 9
    frozen = _prototype_updates(image_folder, freeze, steps)
    never = _prototype_updates(image_folder, 0, steps)
    assert frozen[:freeze] == [0.0] * freeze  # no change at all while frozen (weight decay included)
    for step in range(freeze, steps):
        ratio = frozen[step] / never[step]
        assert 1 / 1.2 <= ratio <= 1.2, (step, frozen, never)


def test_small_batch_sinkhorn_is_refused_and_softmax_learns(image_folder: Path) -> None:
    with pytest.raises(ValueError, match="sinkhorn-queue-size"):
        run(
            dino_recipe(centering="sinkhorn_knopp"),
            dino_dataset(image_folder),
            TrainConfig(steps=1, batch_size=4, log_every=0, num_workers=0),  # 8 teacher rows, 16 prototypes
        )
    # a queue that brings the rows to the prototypes is accepted
    run(
        dino_recipe(centering="sinkhorn_knopp", sinkhorn_queue_size=8),
        dino_dataset(image_folder),
        TrainConfig(steps=1, batch_size=4, log_every=0, num_workers=0),
    )


def test_collapse_diagnostics_are_logged_and_a_flat_loss_warns(
    image_folder: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = dino_recipe(collapse_warn_steps=2)
    cfg = TrainConfig(steps=3, batch_size=8, log_every=1, num_workers=0, output_dir=tmp_path)
    result = run(recipe, dino_dataset(image_folder), cfg)
    ln_k = math.log(HEADS.out_dim)
    for entry in result.logs:
        assert 0.0 <= entry["target_entropy"] <= ln_k + 1e-4
        assert 1 / HEADS.out_dim - 1e-6 <= entry["target_max"] <= 1.0
        assert 0.0 <= entry["agreement"] <= 1.0
        assert 0.99 <= entry["teacher_momentum"] <= 1.0 and "grad_norm" in entry
        assert -1.0 <= entry["view_correlation"] <= 1.0
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [1, 2, 3] and "target_entropy" in lines[0]
    with caplog.at_level(logging.WARNING, logger="ornis.train"):
        recipe.watch.uniform_warned = False
        entry = {"dino": ln_k * 0.995, "target_entropy": ln_k, "view_correlation": 0.2, "teacher_temp": 0.04}
        recipe.on_log(entry, step=5)
        recipe.on_log({"dino": ln_k * 0.995}, step=6)  # once
    warnings = [r for r in caplog.records if "ln K" in r.getMessage()]
    assert len(warnings) == 1 and "within 1%" in warnings[0].getMessage()
    # the cause, in the logged numbers: agreement 0.2 x sharpening 0.1 / 0.04 = 0.5 < 1
    assert "agree by 0.20 (view_correlation)" in warnings[0].getMessage()
    assert "temperature = 2.50: 0.50 below the 1 it needs" in warnings[0].getMessage()
    assert "for small or plain images (--small-images: crops only" in warnings[0].getMessage()
    mild = CollapseWatch(1024, 0.1, 0.04, "softmax", mild_views=True)
    with caplog.at_level(logging.WARNING, logger="ornis.train"):
        mild({"dino": math.log(1024), "view_correlation": 0.2, "teacher_temp": 0.04}, step=5)
    said = caplog.records[-1].getMessage()
    assert "ln K" in said and "--small-images" not in said and said.endswith("or more steps")


def test_view_correlation_counts_agreement_beyond_the_batch_mean() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(64, 256, generator=g), torch.randn(64, 256, generator=g)
    assert float(view_correlation(torch.cat([a, a]))) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(view_correlation(torch.cat([a, b])))) < 0.05
    # an offset shared by every image (what centring removes) is not agreement
    assert abs(float(view_correlation(torch.cat([a + 10, b + 10])))) < 0.05
    assert float(view_correlation(torch.cat([a, 0.5 * a + b]))) == pytest.approx(0.45, abs=0.05)


def test_log_has_no_duplicate_steps_after_resume(image_folder: Path, tmp_path: Path) -> None:
    cfg = dict(steps=4, batch_size=8, lr=1e-3, log_every=1, checkpoint_every=2, num_workers=0)
    run(dino_recipe(), dino_dataset(image_folder), TrainConfig(output_dir=tmp_path, **cfg))
    states = tmp_path / "vit_t16_dino-v2_s2_states.pt"
    run(dino_recipe(), dino_dataset(image_folder), TrainConfig(output_dir=tmp_path, resume=states, **cfg))
    steps = [json.loads(line)["step"] for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_periodic_knn_and_tensorboard(image_folder: Path, tmp_path: Path) -> None:
    shapes = make_shapes(tmp_path / "shapes", per_class=4, size=64)
    cfg = TrainConfig(
        steps=4,
        batch_size=8,
        lr=1e-3,
        log_every=0,
        num_workers=0,
        eval_knn=(shapes, shapes),
        eval_every=2,
        output_dir=tmp_path / "run",
        tensorboard=tmp_path / "tb",
    )
    result = run(dino_recipe(), dino_dataset(image_folder), cfg)
    knn = {e["step"]: e["knn_top1"] for e in result.logs if "knn_top1" in e}
    assert sorted(knn) == [2, 4] and all(0.0 <= v <= 1.0 for v in knn.values())
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == [2, 4] and all("knn_top1" in e for e in lines)
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "tb").iterdir())


def test_help_states_the_small_batch_rule_and_the_recipe_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "dino-v2", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "2 x --batch-size + --sinkhorn-queue-size x processes >= --out-dim" in text
    assert "lr 0.004 x sqrt(B/1024), warm-up 10% of the steps, weight decay 0.04 -> 0.4 (cosine)" in text
    assert main(["train", "mim", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "lr 0.00015 x B/256, warm-up 5% of the steps, weight decay 0.05, betas 0.9/0.95, clip off" in text
    assert main(["train", "classify", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "MAE's fine-tuning rule, 0.001 x batch / 256, meant for fine-tuning" in text


def test_dino_temperatures_reach_the_config() -> None:
    from ornis.cli.train.dino_v2 import add_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["data", "--arch", "vit_t16"]
    assert options_from_args(p.parse_args(argv)).method.student_temp == 0.1
    args = p.parse_args([*argv, "--student-temp", "0.6", "--teacher-temp", "0.05"])
    method = options_from_args(args).method
    assert (method.student_temp, method.teacher_temp) == (0.6, 0.05)


def test_dino_views_and_head_options_reach_the_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ornis.cli.train.dino_v2 import add_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["data", "--arch", "vit_t16"]
    opts = options_from_args(p.parse_args(argv))
    assert (opts.crops.global_scale, opts.crops.local_scale, opts.crops.photometric) == (
        (0.32, 1.0),
        (0.05, 0.32),
        True,
    )
    assert opts.method.heads.batch_norm is False
    args = p.parse_args(
        [*argv, "--global-scale", "0.8", "1", "--local-scale", "0.3", "0.6", "--no-photometric", "--head-batch-norm"]
    )
    opts = options_from_args(args)
    assert (opts.crops.global_scale, opts.crops.local_scale, opts.crops.photometric) == ((0.8, 1.0), (0.3, 0.6), False)
    assert opts.method.heads.batch_norm is True
    bad = ["--local-scale", "0.5", "0.2", "--steps", "1", "-o", str(tmp_path / "run")]
    assert main(["train", "dino-v2", str(tmp_path), "--arch", "vit_t16", *bad]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["ornis: error: local_scale must be two areas 0 < low <= high <= 1, found 0.5 0.2"]


def test_small_images_sets_the_views_and_teacher_and_options_given_by_name_win() -> None:
    from ornis.cli.train.dino_v2 import add_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["data", "--arch", "vit_t16"]
    plain = options_from_args(p.parse_args(argv))
    assert (plain.method.momentum_teacher, plain.method.teacher_temp, plain.method.warmup_teacher_temp) == (
        0.992,
        0.07,
        0.04,
    )
    small = options_from_args(p.parse_args([*argv, "--small-images"]))
    assert (small.crops.global_scale, small.crops.local_scale, small.crops.photometric) == (
        (0.8, 1.0),
        (0.3, 0.6),
        False,
    )
    assert (small.method.momentum_teacher, small.method.teacher_temp, small.method.warmup_teacher_temp) == (
        0.96,
        0.04,
        0.04,
    )
    assert small.method.student_temp == plain.method.student_temp and small.crops.global_size == 224
    given = ["--small-images", "--momentum-teacher", "0.99", "--local-scale", "0.2", "0.5"]
    mixed = options_from_args(p.parse_args([*argv, *given]))
    assert (mixed.method.momentum_teacher, mixed.crops.local_scale) == (0.99, (0.2, 0.5))
    assert (mixed.method.teacher_temp, mixed.crops.global_scale, mixed.crops.photometric) == (0.04, (0.8, 1.0), False)
    crops_only = options_from_args(p.parse_args([*argv, "--no-photometric"]))
    assert (crops_only.crops.photometric, crops_only.crops.global_scale, plain.crops.photometric) == (
        False,
        (0.32, 1.0),
        True,
    )
    assert crops_only.method.momentum_teacher == 0.992


def test_crops_under_96_px_take_the_small_image_settings_unless_told_otherwise(caplog) -> None:
    from ornis.cli.train.dino_v2 import add_arguments, options_from_args

    p = argparse.ArgumentParser()
    add_arguments(p)
    argv = ["data", "--arch", "vit_t16", "--local-size", "16"]
    views = lambda o: (o.crops.global_scale, o.crops.local_scale, o.crops.photometric, o.method.momentum_teacher)  # noqa: E731
    small, published = ((0.8, 1.0), (0.3, 0.6), False, 0.96), ((0.32, 1.0), (0.05, 0.32), True, 0.992)
    caplog.set_level(logging.INFO, logger="ornis.train")
    assert views(options_from_args(p.parse_args([*argv, "--global-size", "32"]))) == small
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 1 and said[0].startswith("global crops of 32 px (under 96): the small-image settings (")
    assert views(options_from_args(p.parse_args([*argv, "--global-size", "64"]))) == small
    given = options_from_args(p.parse_args([*argv, "--global-size", "32", "--momentum-teacher", "0.99"]))
    assert views(given) == (*small[:3], 0.99)
    caplog.clear()
    assert views(options_from_args(p.parse_args([*argv, "--global-size", "96"]))) == published
    assert views(options_from_args(p.parse_args([*argv, "--global-size", "32", "--no-small-images"]))) == published
    assert views(options_from_args(p.parse_args([*argv, "--global-size", "224", "--small-images"]))) == small
    assert not caplog.records  # said only when the size chose it


def test_grad_checkpointing_gives_the_same_losses(tmp_path: Path) -> None:
    from support.training import STATS, TINY_VIT

    from ornis.models import build_model
    from ornis.train.data import SampleDataset, open_source, train_transform
    from ornis.train.supervised import ClassifyRecipe

    shapes = make_shapes(tmp_path / "shapes", per_class=4, size=32)
    data = SampleDataset(open_source(shapes, labelled=True), train_transform(32, STATS, scale=(0.5, 1.0)))
    losses = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = build_model("vit_t16", num_classes=3, size=32, config=TINY_VIT)
        recipe = ClassifyRecipe(net, {"circle": 0, "square": 1, "triangle": 2}, STATS)
        cfg = TrainConfig(steps=3, batch_size=6, lr=3e-3, log_every=0, num_workers=0, grad_checkpointing=checkpointing)
        losses.append(run(recipe, data, cfg).losses)
        assert net.grad_checkpointing is checkpointing
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_best_metric_survives_a_resume(tmp_path: Path) -> None:
    from ornis.train.monitor import best_logged

    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(e) + "\n" for e in ({"step": 2, "val_top1": 0.7}, {"step": 4, "val_top1": 0.9})))
    assert best_logged(log, "val_top1", 3) == 0.7 and best_logged(log, "val_top1", 4) == 0.9
    assert best_logged(log, None, 4) == -math.inf and best_logged(tmp_path / "none", "val_top1", 4) == -math.inf
