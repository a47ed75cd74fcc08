"""``ornis.save_model`` then ``ornis.load_pretrained_model`` gives back the same model: the same architecture
(config overrides included), the same tensors and outputs (torch.equal), and the same classes and statistics, in
both file formats and for every family."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import ornis
from ornis.weights import checkpoint
from ornis.weights.checkpoint import read_checkpoint, write_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")

# family -> (architecture, input size, config overrides that keep it small and differ from the variant)
MODELS = {
    "vit": ("vit_t16", 32, {"patch_size": 4}),
    "hiera": ("hiera_abswin_tiny", 64, {"depths": (1, 1, 1, 1)}),
    "hieradet": ("hieradet_tiny", 64, {"depths": (1, 1, 2, 1), "global_att_blocks": (3,)}),
}
FORMATS = ("pt", "safetensors")
CLASSES = {"finch": 0, "robin": 1, "wren": 2}
RGB_STATS = {"mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]}


def randomised(net: ornis.Encoder) -> ornis.Encoder:
    """Every tensor drawn from N(0, 0.05), so no zero-initialised token or head hides a lost tensor."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    return net.eval()


def assert_same_model(net: ornis.Encoder, loaded: ornis.Encoder, size: int) -> None:
    assert type(loaded) is type(net) and loaded.name == net.name and loaded.config == net.config
    assert loaded.size == net.size and loaded.num_classes == net.num_classes
    own, back = net.state_dict(), loaded.state_dict()
    assert own.keys() == back.keys() and all(torch.equal(own[k], back[k]) for k in own)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(loaded.embedding(x), net.embedding(x))
        assert torch.equal(loaded(x), net(x))


@pytest.mark.parametrize("fmt", FORMATS)
def test_card_example_round_trip(tmp_path: Path, fmt: str) -> None:
    """The issue's example: a ViT with a patch-size override, saved and loaded with nothing else said."""
    net = randomised(ornis.build_model("vit_t16", size=(32, 32), config={"patch_size": 4}))
    path = ornis.save_model(net, tmp_path / f"model.{fmt}")
    loaded, info = ornis.load_pretrained_model(path)
    assert_same_model(net, loaded, 32)
    assert info.network == "vit_t16" and info.custom_config == {"patch_size": 4}
    assert ornis.get_size_from_signature(info.signature) == (32, 32)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", list(MODELS))
def test_every_family_with_a_classifier_round_trips(tmp_path: Path, family: str, fmt: str) -> None:
    name, size, config = MODELS[family]
    net = randomised(ornis.build_model(name, num_classes=len(CLASSES), size=size, config=config))
    # A file name that names no architecture: the file itself must say what it is
    path = ornis.save_model(net, tmp_path / f"mine.{fmt}", class_to_idx=CLASSES, rgb_stats=RGB_STATS)
    loaded, info = ornis.load_pretrained_model(path, inference=True)
    assert_same_model(net, loaded, size)
    assert info.class_to_idx == CLASSES and info.network == name and info.path == path
    assert {k: list(v) for k, v in info.rgb_stats.items()} == RGB_STATS
    assert info.custom_config == config  # tuples stay tuples, in a .safetensors file too
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_defaults_written_when_not_given(tmp_path: Path) -> None:
    """Without classes or statistics the file still has both: "0".."n-1" and the reference's default statistics."""
    net = randomised(ornis.build_model("vit_t16", num_classes=2, size=32, config={"patch_size": 4}))
    ckpt = read_checkpoint(ornis.save_model(net, tmp_path / "m.pt"))
    assert ckpt.class_to_idx == {"0": 0, "1": 1} and ckpt.network == "vit_t16"
    assert ckpt.rgb_stats == {"mean": [0.5191, 0.5306, 0.4877], "std": [0.2316, 0.2304, 0.2588]}


def test_registered_variant_records_no_overrides(tmp_path: Path) -> None:
    net = ornis.build_model("vit_t16", size=32)
    assert read_checkpoint(ornis.save_model(net, tmp_path / "m.safetensors")).config is None


@pytest.mark.parametrize("fmt", FORMATS)
def test_saved_file_mode_follows_the_umask(tmp_path: Path, fmt: str) -> None:
    """0644 under umask 022, like any file a user makes, not mkstemp's 0600 (unreadable to others on a shared
    machine); 0600 under umask 077 for a user who wants that."""
    net = ornis.build_model("vit_t16", size=32, config={"patch_size": 4})
    for mask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(mask)
        try:
            saved = ornis.save_model(net, tmp_path / f"m{mask:o}.{fmt}")
            written = write_checkpoint(read_checkpoint(saved), tmp_path / f"copy{mask:o}.{fmt}")
        finally:
            os.umask(old)
        assert saved.stat().st_mode & 0o777 == mode
        assert written.stat().st_mode & 0o777 == mode
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_save_into_a_folder_is_refused_before_any_work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = ornis.build_model("vit_t16", size=32, config={"patch_size": 4})

    def no_work(*args, **kwargs):
        raise AssertionError("the model was serialised before the destination was checked")

    monkeypatch.setattr(checkpoint, "checkpoint_from_model", no_work)
    with pytest.raises(IsADirectoryError) as e:
        ornis.save_model(net, tmp_path)
    assert e.value.filename == str(tmp_path)
    assert e.value.strerror == "a folder; expected the name of the .pt or .safetensors file to write"
    assert list(tmp_path.iterdir()) == []
