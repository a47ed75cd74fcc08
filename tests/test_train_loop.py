"""The shared training loop: schedule, parameter groups, EMA, data order, accumulation, resume, states files.

Most tests use a toy recipe (a tiny conv net on generated coloured shapes, ``support.training``) so that the loop
itself is what is measured; the recipes have their own test files.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from support.training import STATS, TINY_VIT, make_shapes, write_shards
from torch import nn

from ornis.data.keys import SampleKey
from ornis.errors import OrnisError
from ornis.train.config import Recipe, TrainConfig
from ornis.train.data import ImageFolderSource, SampleDataset, TarShardSource, open_source, train_transform
from ornis.train.loop import run
from ornis.train.optim import ModelEMA, cosine_lr, layer_ids, param_groups
from ornis.train.sampling import StepBatches
from ornis.train.states import find_latest_states
from ornis.weights.checkpoint import checkpoint_from_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


class ToyRecipe(Recipe):
    """Cross-entropy of a 2-layer conv net: small enough that the loop's own behaviour is what a test sees."""

    name = "toy"

    def __init__(self, seed: int = 0) -> None:
        torch.manual_seed(seed)
        self.model = nn.Sequential(
            nn.Conv2d(3, 8, 4, stride=4),
            nn.GELU(),
            nn.Dropout(0.2),
            nn.Flatten(),
            nn.LayerNorm(8 * 8 * 8),
            nn.Linear(8 * 8 * 8, 3),
        )
        self.model.size = (32, 32)
        self.model.num_classes = 3
        self.steps_seen: list[int] = []

    def loss(self, model, batch, step):
        images, labels = batch
        noise = torch.randn(()) * 1e-3  # a draw from the global RNG inside the step, as mixup or masks make
        return F.cross_entropy(model(images), labels) + noise, {"noise": float(noise)}

    def after_step(self, step: int) -> None:
        self.steps_seen.append(step)

    def state_dict(self):
        return {"steps_seen": list(self.steps_seen)}

    def load_state_dict(self, state):
        self.steps_seen = list(state["steps_seen"])

    def export_checkpoint(self):
        from ornis.weights.checkpoint import Checkpoint, make_signature

        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        return Checkpoint(state, make_signature((32, 32), 3), {"a": 0, "b": 1, "c": 2}, STATS, network=None)


def toy_dataset(root: Path) -> SampleDataset:
    return SampleDataset(
        open_source(root, labelled=True), train_transform(32, STATS, scale=(0.5, 1.0), auto_augment="trivialaugment")
    )


# -- optim.py -------------------------------------------------------------------------------------------------------
def test_cosine_schedule_values():
    lr, lo = 1e-3, 1e-5
    assert cosine_lr(0, 100, lr, lo, 10) == pytest.approx(1e-4)
    assert cosine_lr(9, 100, lr, lo, 10) == pytest.approx(1e-3)
    assert cosine_lr(10, 100, lr, lo, 10) == pytest.approx(1e-3)
    assert cosine_lr(55, 100, lr, lo, 10) == pytest.approx((lr + lo) / 2)  # half way through the cosine
    assert cosine_lr(100, 100, lr, lo, 10) == pytest.approx(lo)
    assert cosine_lr(0, 10, lr, lo, 0) == pytest.approx(lr)


def test_param_groups_decay_exclusions_and_layer_decay():
    from ornis.models import build_model

    net = build_model("vit_t16", num_classes=3, size=32, config={**TINY_VIT, "layer_scale_init": 1e-5})
    ids, n = layer_ids(net)
    assert n == 3  # stem 0, blocks 1..2, head 3
    assert ids["conv_proj.weight"] == 0 and ids["pos_embedding"] == 0 and ids["class_token"] == 0
    assert ids["encoder.block.0.attn.qkv.weight"] == 1 and ids["encoder.block.1.mlp.3.weight"] == 2
    assert ids["norm.weight"] == 3 and ids["classifier.weight"] == 3
    groups = param_groups(net, weight_decay=0.05, layer_decay=0.5)
    by_name = {name: g for g in groups for name in g["names"]}
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    for name in (
        "pos_embedding",
        "class_token",
        "encoder.block.0.attn.qkv.bias",
        "encoder.block.0.layer_scale_1.gamma",
        "norm.weight",
    ):
        assert by_name[name]["weight_decay"] == 0.0, name
    assert by_name["encoder.block.0.attn.qkv.weight"]["weight_decay"] == 0.05
    assert by_name["conv_proj.weight"]["lr_scale"] == pytest.approx(0.125)  # 0.5 ** (3 - 0)
    assert by_name["encoder.block.1.mlp.0.weight"]["lr_scale"] == pytest.approx(0.5)
    assert by_name["classifier.weight"]["lr_scale"] == pytest.approx(1.0)
    # Hiera's blocks are numbered per stage (body.stage<k>.<i>): counted as one sequence over the stages
    hiera = build_model(
        "hiera_abswin_tiny", num_classes=2, size=64, config={"depths": (1, 2, 1, 1), "embed_dim": 16, "num_heads": 1}
    )
    ids, n = layer_ids(hiera)
    assert n == 6 and ids["pos_embed_win"] == 0 and ids["stem.proj.weight"] == 0
    assert [ids[f"body.{b}.attn.qkv.weight"] for b in ("stage1.0", "stage2.0", "stage2.1", "stage3.0", "stage4.0")] == [
        1,
        2,
        3,
        4,
        5,
    ]
    assert ids["features.1.weight"] == 6 and ids["classifier.weight"] == 6


def test_ema_update_and_swap():
    lin = nn.Linear(2, 1)
    with torch.no_grad():
        lin.weight.fill_(1.0)
    ema = ModelEMA(lin, 0.9)
    with torch.no_grad():
        lin.weight.fill_(3.0)
    ema.update(lin)
    assert torch.allclose(ema.shadow["weight"], torch.full((1, 2), 1.2))  # 0.9 * 1 + 0.1 * 3
    with ema.applied_to(lin):
        assert float(lin.weight[0, 0].detach()) == pytest.approx(1.2)
    assert float(lin.weight[0, 0].detach()) == 3.0


# -- data order -------------------------------------------------------------------------------------------------------
def test_step_batches_same_samples_for_any_number_of_ranks():
    cfg = TrainConfig(steps=10, batch_size=8, seed=3)
    single = StepBatches(20, cfg, 0, 10, 0, 1)
    split = [StepBatches(20, TrainConfig(steps=10, batch_size=8, seed=3, grad_accum=2), 0, 10, r, 2) for r in range(2)]
    for step in range(10):
        parts = [k for s in split for m in range(2) for k in s.keys(step, m)]
        assert parts == single.keys(step, 0)
    # the first 20 stream positions are epoch 0: every sample once
    first_epoch = [k.index for step in range(2) for k in single.keys(step, 0)] + [
        k.index for k in single.keys(2, 0)[:4]
    ]
    assert sorted(first_epoch) == list(range(20))
    # resuming at step 6 yields what an uninterrupted sampler yields from step 6
    assert list(StepBatches(20, cfg, 6, 10, 0, 1)) == list(single)[6:]
    with pytest.raises(ValueError, match="multiple"):
        StepBatches(20, TrainConfig(steps=1, batch_size=6), 0, 1, 0, 4)


def test_sample_dataset_is_a_function_of_the_key(shapes):
    ds = toy_dataset(shapes)
    a, b = ds[SampleKey(5, 123)], ds[SampleKey(5, 123)]
    torch.manual_seed(999)  # the global RNG state must not matter
    c = ds[SampleKey(5, 123)]
    assert torch.equal(a[0], b[0]) and torch.equal(a[0], c[0]) and a[1] == c[1]
    assert not torch.equal(a[0], ds[SampleKey(5, 124)][0])


def test_unlabelled_nested_folder_and_tar_shards(tmp_path, shapes):
    loose = make_shapes(tmp_path / "loose", per_class=2, labelled=False)
    src = open_source(loose, labelled=False)
    assert len(src) == 6 and {label for _, label in src.samples} == {-1}
    with pytest.raises(OrnisError, match="no <class>/<image>"):
        ImageFolderSource(tmp_path / "loose" / "batch0", labelled=True)  # images, no class folders
    shards = write_shards(tmp_path, shapes, shards=2)
    tar_source = open_source(tmp_path, labelled=True)
    assert isinstance(tar_source, TarShardSource) and len(tar_source) == 36
    folder_source = ImageFolderSource(shapes)
    by_key = {m.key: m for m in tar_source.members}
    for i in (0, 17, 35):  # sample i went to shard i % 2 under key sample<i>
        member = by_key[f"sample{i:05d}"]
        assert member.shard == shards[i % 2]
        j = tar_source.members.index(member)
        img, label = tar_source.read(j)
        ref, ref_label = folder_source.read(i)
        assert label == ref_label and np.array_equal(np.asarray(img), np.asarray(ref))
    assert tar_source.class_to_idx == {"0": 0, "1": 1, "2": 2}


# -- the loop ---------------------------------------------------------------------------------------------------------
def test_grad_accumulation_equals_one_big_batch(shapes):
    ds = toy_dataset(shapes)
    base = dict(steps=3, batch_size=12, lr=1e-2, log_every=0, grad_clip=None)
    # Dropout and the noise term draw from the per-step RNG in a different order under accumulation, so compare
    # with them switched off: same samples, same gradient up to float summation order
    r1, r2 = ToyRecipe(), ToyRecipe()
    for r in (r1, r2):
        r.model[2].p = 0.0
        r.loss = lambda model, batch, step: (F.cross_entropy(model(batch[0]), batch[1]), {})
    a = run(r1, ds, TrainConfig(**base))
    b = run(r2, ds, TrainConfig(**base, grad_accum=3))
    assert sorted(a.losses) == sorted(b.losses) == [0, 1, 2]
    assert max(abs(a.losses[s] - b.losses[s]) for s in range(3)) < 1e-5


def test_loader_workers_do_not_change_the_numbers(shapes):
    """Augmentations are seeded per sample, not per worker: 2 loader processes give the losses of 0."""
    ds = toy_dataset(shapes)
    base = dict(steps=3, batch_size=6, log_every=0)
    inline = run(ToyRecipe(), ds, TrainConfig(**base, num_workers=0))
    workers = run(ToyRecipe(), ds, TrainConfig(**base, num_workers=2))
    assert workers.losses == inline.losses


def test_resume_is_exact_with_ema_and_states_file(tmp_path, shapes):
    ds = toy_dataset(shapes)
    kw = dict(steps=8, batch_size=6, lr=5e-3, warmup_steps=2, ema_decay=0.8, log_every=1, grad_accum=2)
    full = run(ToyRecipe(), ds, TrainConfig(output_dir=tmp_path / "full", **kw))
    part = run(ToyRecipe(), ds, TrainConfig(output_dir=tmp_path / "split", stop_at=3, **kw))
    assert sorted(part.losses) == [0, 1, 2] and part.checkpoint is None
    states = find_latest_states(tmp_path / "split")
    assert states is not None and states.name == "model_toy_s3_states.pt"
    saved = torch.load(states, weights_only=True)  # tensors and plain data only
    assert saved["step"] == 3 and saved["recipe"] == {"steps_seen": [0, 1, 2]}
    resumed_recipe = ToyRecipe(seed=7)  # a different init: everything must come from the states file
    rest = run(resumed_recipe, ds, TrainConfig(output_dir=tmp_path / "split", resume=True, **kw))
    assert sorted(rest.losses) == list(range(3, 8))
    for s in range(3, 8):
        assert rest.losses[s] == full.losses[s], s
    assert resumed_recipe.steps_seen == list(range(8))
    for name in ("model_toy.pt", "model_toy_s8_ema.pt"):
        a = torch.load(tmp_path / "full" / name, weights_only=True)["state"]
        b = torch.load(tmp_path / "split" / name, weights_only=True)["state"]
        assert all(torch.equal(a[k], b[k]) for k in a), name
    ema = torch.load(tmp_path / "full" / "model_toy_s8_ema.pt", weights_only=True)["state"]
    final = torch.load(tmp_path / "full" / "model_toy.pt", weights_only=True)["state"]
    assert not torch.equal(ema["5.weight"], final["5.weight"])
    lines = (tmp_path / "full" / "log.jsonl").read_text().splitlines()
    assert len(lines) == 8 and '"images_per_s"' in lines[0] and '"lr"' in lines[0]
    with pytest.raises(OrnisError, match="batch_size=6"):
        run(ToyRecipe(), ds, TrainConfig(output_dir=tmp_path / "split", **{**kw, "batch_size": 12}, resume=states))


def test_bf16_autocast_and_nonfinite_loss(shapes):
    ds = toy_dataset(shapes)
    fp32 = run(ToyRecipe(), ds, TrainConfig(steps=2, batch_size=6, log_every=0))
    bf16 = run(ToyRecipe(), ds, TrainConfig(steps=2, batch_size=6, log_every=0, bf16=True))
    assert abs(bf16.losses[0] - fp32.losses[0]) < 0.05
    bad = ToyRecipe()
    bad.loss = lambda model, batch, step: (model(batch[0]).sum() * float("nan"), {})
    with pytest.raises(OrnisError, match="not finite"):
        run(bad, ds, TrainConfig(steps=1, batch_size=6, log_every=0))


def test_checkpoint_from_model_records_config_overrides(tmp_path):
    import ornis
    from ornis.models import build_model
    from ornis.weights.checkpoint import write_checkpoint

    net = build_model("vit_t16", num_classes=3, size=32, config=TINY_VIT)
    ckpt = checkpoint_from_model(net, class_to_idx={"a": 0, "b": 1, "c": 2}, rgb_stats=STATS)
    assert ckpt.network == "vit_t16" and ckpt.config == TINY_VIT and ckpt.size == (32, 32) and ckpt.num_classes == 3
    path = write_checkpoint(ckpt, tmp_path / "x.pt")
    loaded, info = ornis.load_pretrained_model(path, inference=True)
    x = torch.randn(2, 3, 32, 32)
    net.eval()
    assert torch.equal(loaded(x), net(x)) and info.class_to_idx == {"a": 0, "b": 1, "c": 2}
