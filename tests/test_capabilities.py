"""What every encoder declares for the training recipes (strides, stem width, weight-decay exclusions, layer groups,
blocks, masked forwards) is true of the model it is declared on; and the recipes ask for it instead of testing
the family (a grep over ``src/ornis/train``)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch import nn

import ornis
from ornis.models import MaskedTokenOmission, MaskedTokenRetention, UnsupportedEncoderError
from ornis.models.capabilities import require
from ornis.models.registry import families_with, get_model_spec
from ornis.train.optim import layer_ids, param_groups
from ornis.train.wrap import sharded_blocks

pytestmark = pytest.mark.usefixtures("one_thread")

# Tiny variants of every registered family (64 px); a new family must add its own here
TINY = {
    "vit": {
        "vit_reg4_t16_nps_ls": {"num_layers": 2, "hidden_dim": 32, "mlp_dim": 64, "num_heads": 2},
        "vit_reg1_t16": {"num_layers": 2, "hidden_dim": 32, "mlp_dim": 64, "num_heads": 2},
        "flexivit_t16": {"num_layers": 2, "hidden_dim": 32, "mlp_dim": 64, "num_heads": 2},
    },
    "hiera": {
        "hiera_tiny": {"depths": (1, 2, 1, 1), "embed_dim": 16, "num_heads": 1, "drop_path_rate": 0.0},
        "hiera_abswin_tiny": {"depths": (1, 1, 2, 1), "embed_dim": 16, "num_heads": 1, "drop_path_rate": 0.0},
    },
    "hieradet": {
        "hieradet_tiny": {"depths": (1, 1, 2, 1), "embed_dim": 16, "num_heads": 1, "global_att_blocks": (3,)},
        "hieradet_d_tiny": {"depths": (1, 2, 1, 1), "embed_dim": 16, "num_heads": 1, "global_att_blocks": ()},
    },
}
VARIANTS = [(name, config) for family in TINY.values() for name, config in family.items()]
SIZE = (64, 96)  # not square: a side mixed up with the other shows


def build(name: str, config: dict, num_classes: int = 3) -> ornis.models.Encoder:
    torch.manual_seed(0)
    net = ornis.build_model(name, num_classes=num_classes, size=SIZE, config={**config, "drop_path_rate": 0.0})
    return net.eval()


def test_every_registered_family_is_covered() -> None:
    assert {get_model_spec(n).family for n in ornis.list_models()} == set(TINY)
    assert all(get_model_spec(name).family == family for family, names in TINY.items() for name in names)


@pytest.mark.parametrize("name, config", VARIANTS)
def test_strides_and_stem_width(name: str, config: dict) -> None:
    net = build(name, config)
    x = torch.randn(1, 3, *SIZE)
    with torch.no_grad():
        maps = list(net.detection_features(x).values())
    first, last = maps[0], maps[-1]
    assert (SIZE[0] // last.shape[-2], SIZE[1] // last.shape[-1]) == (net.max_stride, net.max_stride)
    assert last.shape[-2] * net.max_stride == SIZE[0] and last.shape[-1] * net.max_stride == SIZE[1]
    assert (SIZE[0] // first.shape[-2], SIZE[1] // first.shape[-1]) == (net.stem_stride, net.stem_stride)
    assert net.stem_width == net.return_channels[0] == first.shape[1]


@pytest.mark.parametrize("name, config", VARIANTS)
def test_no_weight_decay_names_positions_and_tokens(name: str, config: dict) -> None:
    net = build(name, config)
    params = dict(net.named_parameters())
    declared = net.no_weight_decay()
    assert declared <= params.keys()
    # every position table and learned token is declared, and nothing else
    expected = {n for n in params if re.search(r"pos_embed|_token", n)}
    assert declared == expected and expected
    if name.startswith("vit_reg4"):
        assert declared == {"pos_embedding", "class_token", "reg_tokens"}
    groups = param_groups(net, weight_decay=0.05)
    decayed = {n for g in groups if g["weight_decay"] for n in g["names"]}
    assert not decayed & declared and all(params[n].ndim > 1 for n in decayed)


@pytest.mark.parametrize("name, config", VARIANTS)
def test_blocks_and_layer_groups(name: str, config: dict) -> None:
    net = build(name, config)
    blocks = net.blocks()
    cfg = net.config
    assert len(blocks) == (cfg.num_layers if hasattr(cfg, "num_layers") else sum(cfg.depths))
    assert net.num_layer_groups == len(blocks) + 2
    own = {id(p): i + 1 for i, blk in enumerate(blocks) for p in blk.parameters()}
    groups: dict[int, list[str]] = {}
    for pname, p in net.named_parameters():
        lid = net.layer_id(pname)
        assert 0 <= lid < net.num_layer_groups, pname
        assert lid == own.get(id(p), lid), pname  # a block's parameters are in its group
        if id(p) not in own:
            assert lid in (0, net.num_layer_groups - 1), pname  # outside the blocks: stem or head
        groups.setdefault(lid, []).append(pname)
    # every parameter in exactly one group, every group used
    names = [n for members in groups.values() for n in members]
    assert sorted(names) == sorted(n for n, _ in net.named_parameters()) and len(set(names)) == len(names)
    assert sorted(groups) == list(range(net.num_layer_groups))
    stem = set(groups[0])
    assert {n.split(".")[0] for n in stem} <= set(net.stem_names) and net.no_weight_decay() <= stem
    assert "classifier.weight" in groups[net.num_layer_groups - 1]
    # the optimizer's view is the encoder's
    ids, last = layer_ids(net)
    assert last == net.num_layer_groups - 1 and all(ids[n] == net.layer_id(n) for n in ids)


def with_capability(capability: type) -> list[tuple[str, dict]]:
    return [(name, config) for name, config in VARIANTS if issubclass(get_model_spec(name).cls, capability)]


@pytest.mark.parametrize("name, config", with_capability(MaskedTokenRetention))
def test_masked_retention_without_a_mask_is_the_plain_forward(name: str, config: dict) -> None:
    net = build(name, config)
    x = torch.randn(2, 3, *SIZE)
    grid = net.retention_grid(SIZE)
    nothing = torch.zeros(2, grid[0] * grid[1], dtype=torch.bool)
    token = torch.randn(net.stem_width)
    with torch.no_grad():
        out = net.masked_retention(x, nothing, token)
        plain = net.masked_retention(x)
        embedding = net.embedding(x)
        some = nothing.clone()
        some[0, 0] = True
        masked = net.masked_retention(x, some, token)
    torch.testing.assert_close(out.embedding, embedding, rtol=0, atol=1e-6)
    torch.testing.assert_close(out.patch_tokens, plain.patch_tokens, rtol=0, atol=1e-6)
    assert out.patch_tokens.shape == (2, grid[0] * grid[1], net.embedding_size)
    assert not torch.allclose(masked.embedding[0], embedding[0]) and torch.allclose(masked.embedding[1], embedding[1])


@pytest.mark.parametrize("name, config", with_capability(MaskedTokenOmission))
def test_masked_omission_hiding_nothing_is_the_plain_forward(name: str, config: dict) -> None:
    net = build(name, config)
    x = torch.randn(2, 3, *SIZE)
    layout = net.omission_layout(SIZE)
    assert (layout.grid[0] * layout.cell, layout.grid[1] * layout.cell) == SIZE
    assert layout.cell == layout.cell_tokens * net.stem_stride
    cells = layout.grid[0] * layout.grid[1]
    with torch.no_grad():
        scales = net.masked_omission(x, torch.zeros(2, cells, dtype=torch.bool))
        final = net.forward_features(x)
        hidden = torch.zeros(2, cells, dtype=torch.bool)
        hidden[:, : cells // 2] = True
        half = net.masked_omission(x, hidden)
    special = layout.special_tokens  # a ViT's class and register tokens lead its final output, as in the plain one
    assert special == getattr(net, "num_special_tokens", 0)
    shapes = [(2, cells, m, m, c) for c, m in zip(layout.scale_channels, layout.scale_sides)]
    shapes[-1] = (2, special + cells, *shapes[-1][2:])
    assert [tuple(s.shape) for s in scales] == shapes
    kept = [(2, cells - cells // 2, *shape[2:]) for shape in shapes]
    kept[-1] = (2, special + cells - cells // 2, *shapes[-1][2:])
    assert [tuple(s.shape) for s in half] == kept
    if layout.scale_sides[-1] == 1:  # a ViT: the plain forward's final tokens
        torch.testing.assert_close(scales[-1].reshape(final.shape), final, rtol=0, atol=1e-6)
    else:  # Hiera-MAE's last stage runs at stride 16 (its parity: test_train_mim); its first is the plain one's
        assert layout.scale_sides == (8, 4, 2)
        with torch.no_grad():
            first = net.detection_features(x)["stage1"]
        B, C, H, W = first.shape
        units = first.view(B, C, H // 8, 8, W // 8, 8).permute(0, 2, 4, 3, 5, 1).reshape(B, -1, 8, 8, C)
        torch.testing.assert_close(scales[0], units, rtol=0, atol=1e-6)


def test_capabilities_per_family_and_the_error_naming_the_architecture() -> None:
    assert families_with(MaskedTokenOmission) == ["hiera", "vit"]
    assert families_with(MaskedTokenRetention) == ["hieradet", "vit"]
    hiera = build("hiera_tiny", TINY["hiera"]["hiera_tiny"])
    with pytest.raises(UnsupportedEncoderError, match=r"DINOv2 training needs .*'hiera_tiny'.*hieradet, vit"):
        require(hiera, MaskedTokenRetention, "DINOv2 training")
    from ornis.train.dino_v2 import DinoV2Recipe
    from ornis.train.mim import MaskedAutoencoder

    with pytest.raises(UnsupportedEncoderError, match="hiera_tiny"):
        DinoV2Recipe(hiera)
    hieradet = build("hieradet_tiny", TINY["hieradet"]["hieradet_tiny"])
    with pytest.raises(UnsupportedEncoderError, match="masked image modelling needs .*'hieradet_tiny'"):
        MaskedAutoencoder(hieradet)


def test_wrappers_find_the_encoder_blocks() -> None:
    """FSDP shards the encoder's blocks, not the MAE decoder's; the decoder's modules join the encoder's last layer
    group (parameters listed before the encoder's, the MAE's own tokens, its first)."""
    from ornis.train.mim import MaskedAutoencoder

    for name in ("vit_reg1_t16", "hiera_abswin_tiny"):
        net = build(name, dict(VARIANTS)[name], num_classes=0)
        mae = MaskedAutoencoder(net, decoder_dim=16, decoder_depth=2, decoder_heads=2)
        assert [id(b) for b in sharded_blocks(mae)] == [id(b) for b in net.blocks()]
        ids, last = layer_ids(mae)
        assert last == net.num_layer_groups - 1
        assert {ids[n] for n in ids if n.startswith(("decoder_blocks.", "decoder_pred.", "decoder_norm."))} == {last}
        assert ids["mask_token"] == ids["decoder_pos_embed"] == 0
        assert all(ids[f"encoder.{n}"] == net.layer_id(n) for n, _ in net.named_parameters())


def test_hieradet_from_scratch_init_and_no_init_on_the_meta_device() -> None:
    net = build("hieradet_tiny", TINY["hieradet"]["hieradet_tiny"], num_classes=5)
    for m in net.modules():
        if isinstance(m, nn.Linear):
            assert 0.015 < float(m.weight.detach().std()) < 0.025
            assert not m.bias.any()
        elif isinstance(m, nn.LayerNorm):
            assert bool((m.weight == 1).all()) and not m.bias.any()
    for table in (net.pos_embed, net.pos_embed_win):
        assert 0.01 < float(table.detach().std()) < 0.03
    with torch.device("meta"):
        meta = ornis.build_model("hieradet_small", num_classes=10)
    assert all(p.is_meta for p in meta.parameters())


# -- the recipes ask; they never test the family ------------------------------------------------------------------
TRAIN = Path(ornis.__file__).parent / "train"
FAMILY_CHECKS = [
    re.compile(r"isinstance\([^)]*\b(ViT|Hiera|HieraDet)\b"),
    re.compile(r"""["'](vit|flexivit|hiera|hieradet)["']"""),
    re.compile(r"\.family\s*[!=]="),
    re.compile(r"family_of|getattr\([^)]*[\"']family[\"']"),
]


@pytest.mark.parametrize("path", sorted(TRAIN.rglob("*.py")), ids=lambda p: str(p.relative_to(TRAIN)))
def test_train_package_does_not_test_families(path: Path) -> None:
    text = path.read_text()
    found = [m.group(0) for pattern in FAMILY_CHECKS for m in pattern.finditer(text)]
    assert not found, f"{path}: {found}"
