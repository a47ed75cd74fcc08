"""Training's user mistakes end in one line before any work (issues 14 and 15): ranges, --model-config, labelled
sets with one or an empty class, a --val that does not fit, resuming another run's states, a Sinkhorn queue under
several processes, --eval-knn with --fsdp."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from support.training import TINY_VIT, dino_recipe, make_shapes, stripes

from ornis.cli.main import main
from ornis.errors import OrnisError
from ornis.train.config import TrainConfig
from ornis.train.dino_v2 import DinoV2Config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=3, size=32)


def _classify(train: Path, out: Path, *more: str) -> list[str]:
    return [
        "train",
        "classify",
        str(train),
        "--arch",
        "vit_t16",
        "--size",
        "32",
        "--steps",
        "1",
        "--batch-size",
        "3",
        "--workers",
        "0",
        "--model-config",
        json.dumps(TINY_VIT),
        "-o",
        str(out),
        *more,
    ]


def _one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ornis: error: "), err
    return err[0]


@pytest.mark.parametrize(
    "field, value", [("steps", -5), ("steps", 0), ("batch_size", 0), ("grad_accum", 0), ("log_every", -1)]
)
def test_train_config_rejects_out_of_range_values(field: str, value: int) -> None:
    kw = {"steps": 10, field: value}
    with pytest.raises(ValueError, match=f"TrainConfig.{field} must be an integer >= "):
        TrainConfig(**kw)
    with pytest.raises(ValueError, match="TrainConfig.lr must be above 0"):
        TrainConfig(steps=1, lr=0.0)


@pytest.mark.parametrize(
    "flags", [["--steps", "-5"], ["--batch-size", "0"], ["--lr", "-1"], ["--workers", "-1"], ["--ema-decay", "1.5"]]
)
def test_cli_range_errors_are_usage_errors(shapes: Path, tmp_path: Path, capsys, flags: list[str]) -> None:
    code = main(_classify(shapes, tmp_path / "out", *flags))
    err = capsys.readouterr().err
    assert code == 2 and f"argument {flags[0]}" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "config, message",
    [
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "not JSON"),
        ('{"no_such_field": 1}', "no_such_field"),
        ('{"num_layers": "x"}', "wrong type"),
    ],
)
def test_model_config_mistakes_are_one_line(shapes: Path, tmp_path: Path, capsys, config: str, message: str) -> None:
    args = _classify(shapes, tmp_path / "out")
    args[args.index("--model-config") + 1] = config
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert sum(line.startswith(("ornis: error", "ornis train classify: error")) for line in err.splitlines()) == 1


def test_single_class_and_empty_class_are_errors(shapes: Path, tmp_path: Path, capsys) -> None:
    one = tmp_path / "one"
    shutil.copytree(shapes / "circle", one / "circle")
    assert main(_classify(one, tmp_path / "a")) == 1
    assert "1 class(es) ['circle']; classification needs at least 2" in _one_error_line(capsys)
    empty = tmp_path / "empty"
    shutil.copytree(shapes, empty)
    (empty / "hexagon").mkdir()
    assert main(_classify(empty, tmp_path / "b")) == 1
    assert "class folder(s) ['hexagon'] hold no image" in _one_error_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_val_is_checked_before_the_first_step(shapes: Path, tmp_path: Path, capsys) -> None:
    assert main(_classify(shapes, tmp_path / "a", "--val", str(tmp_path / "missing"))) == 1
    assert "missing" in _one_error_line(capsys)
    other = make_shapes(tmp_path / "other", per_class=1, size=32)
    (other / "circle").rename(other / "oval")
    assert main(_classify(shapes, tmp_path / "b", "--val", str(other))) == 1
    assert "['oval'] are not among the expected classes" in _one_error_line(capsys)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()  # no step was taken


def test_eval_knn_with_fsdp_is_refused_in_one_line(shapes: Path, tmp_path: Path, capsys) -> None:
    # the k-NN embeds on rank 0 alone, which a sharded model cannot do: refused before torchrun is even asked for
    assert main(_classify(shapes, tmp_path / "a", "--fsdp", "--eval-knn", str(shapes), str(shapes))) == 1
    assert _one_error_line(capsys) == "ornis: error: --eval-knn is not supported with --fsdp yet: drop one of them"
    assert not (tmp_path / "a").exists()


def test_resuming_another_recipes_states_is_one_line(shapes: Path, tmp_path: Path, capsys) -> None:
    assert main(_classify(shapes, tmp_path / "cls")) == 0
    states = next((tmp_path / "cls").glob("*_states.pt"))
    capsys.readouterr()
    images = tmp_path / "images"
    images.mkdir()
    for i, img in enumerate(stripes(4)):
        img.save(images / f"{i}.png")
    dino = "--global-size 64 --local-size 32 --local-crops 0 --out-dim 16 --head-hidden-dim 32 --head-bottleneck-dim 16"
    code = main(
        ["train", "dino-v2", str(images), "--arch", "vit_t16", *dino.split(), "--steps", "2", "--batch-size", "4"]
        + ["--workers", "0", "--model-config", json.dumps(TINY_VIT), "-o", str(tmp_path / "d"), "--resume", str(states)]
    )
    assert code == 1
    line = _one_error_line(capsys)
    assert "is a classify run of vit_t16_classify, this is a dino-v2 run of vit_t16_dino-v2" in line
    # another architecture under the same recipe: one line with counts, not the keys
    wider = {**TINY_VIT, "hidden_dim": 32, "mlp_dim": 64}
    args = _classify(shapes, tmp_path / "cls", "--resume", str(states))
    args[args.index("--model-config") + 1] = json.dumps(wider)
    assert main(args) == 1
    line = _one_error_line(capsys)
    assert "was written by another model" in line and "of another shape" in line and len(line) < 400


def test_sinkhorn_queue_of_another_process_count_is_refused() -> None:
    recipe = dino_recipe(centering="sinkhorn_knopp", sinkhorn_queue_size=8)
    state = recipe.state_dict()
    assert state["queue_processes"] == 1
    other = dino_recipe(centering="sinkhorn_knopp", sinkhorn_queue_size=8)
    other.load_state_dict(state)  # one process to one process: exact
    torch.testing.assert_close(other.queues["dino"].rows, recipe.queues["dino"].rows)
    other.world = 2
    with pytest.raises(OrnisError, match="cannot be restored into a 2-process one"):
        other.load_state_dict(state)
    other.world = 1
    with pytest.raises(OrnisError, match="2-process run"):
        other.load_state_dict({**state, "queue_processes": 2})


def test_dino_crops_the_backbone_cannot_take_are_refused_before_the_first_step(tmp_path, capsys) -> None:
    # HieraDet takes inputs in multiples of 32 px: a 16 px local crop used to fail mid-step with a traceback
    images = tmp_path / "images"
    images.mkdir()
    for i, img in enumerate(stripes(4)):
        img.save(images / f"{i}.png")
    heads = "--out-dim 16 --head-hidden-dim 32 --head-bottleneck-dim 16 --steps 1 --batch-size 2 --workers 0"
    crops = "--global-size 64 --local-size 16 --local-crops 1"
    args = ["train", "dino-v2", str(images), "--arch", "hieradet_d_tiny", *crops.split(), *heads.split()]
    code = main([*args, "-o", str(tmp_path / "d")])
    assert code == 2
    line = _one_error_line(capsys)
    assert "hieradet_d_tiny takes inputs in multiples of 32 px, not the local crop of 16 px" in line
    assert not (tmp_path / "d" / "log.jsonl").exists()
    # no local crops: nothing to refuse about the local size
    assert main([*args, "--local-crops", "0", "-o", str(tmp_path / "ok")]) == 0


def test_an_output_that_is_a_file_is_refused_before_any_work(shapes: Path, tmp_path: Path, capsys) -> None:
    # it used to surface from the loop's mkdir as "<path>: File exists"
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    for out in (taken, taken / "run"):
        assert main(_classify(shapes, out)) == 1  # an OSError, as for every other output (tests/test_cli_errors.py)
        assert _one_error_line(capsys) == f"ornis: error: {taken}: Not a directory"
    assert taken.read_text() == "not a folder"


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan"])
def test_mask_probability_outside_0_1_is_refused(tmp_path: Path, capsys, value: str) -> None:
    args = ["train", "dino-v2", str(tmp_path), "--arch", "vit_t16", "--steps", "1", "-o", str(tmp_path / "d")]
    assert main([*args, "--mask-probability", value]) == 2
    err = capsys.readouterr().err
    assert "argument --mask-probability" in err and "Traceback" not in err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("kw", [{"mask_probability": 1.5}, {"mask_ratio": (0.5, 0.1)}, {"mask_ratio": (0.1, 1.2)}])
def test_dino_config_refuses_masks_outside_0_1(kw: dict) -> None:
    with pytest.raises(ValueError, match="DinoV2Config.mask_"):
        DinoV2Config(**kw)
    DinoV2Config(mask_probability=1.0, mask_ratio=(0.0, 1.0))  # the bounds themselves are accepted
