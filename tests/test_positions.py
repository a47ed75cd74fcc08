"""Sine-cosine position embeddings at the start of training from scratch (``SinCosPositions``, issue 14): the table,
what each family writes, where the recipes use it and where they must not (a checkpoint keeps its own)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

import ornis
from ornis.models.capabilities import SinCosPositions
from ornis.models.layers import sincos_table
from ornis.train.dino_v2 import DinoV2Options
from ornis.train.mim import MIMOptions, build_mae
from ornis.train.start import start_encoder
from ornis.train.supervised import ClassifyOptions

SMALL = {
    "vit_t16": (32, {"patch_size": 4}),
    "flexivit_t16": (32, {"patch_size": 4, "min_patch_size": 4, "max_patch_size": 8}),
    "hieradet_d_tiny": (64, {}),
    "hiera_tiny": (128, {}),
    "hiera_abswin_tiny": (128, {}),
}


def test_the_table_is_mae_s() -> None:
    t = sincos_table((2, 3), 8)  # 2 frequencies per quarter: 1 and 1 / 100
    assert t.shape == (6, 8) and t.dtype == torch.float32
    row, col = 1, 2  # the last position, row-major
    omega = (1.0, 0.01)
    expected = [math.sin(row * w) for w in omega] + [math.cos(row * w) for w in omega]
    expected += [math.sin(col * w) for w in omega] + [math.cos(col * w) for w in omega]
    torch.testing.assert_close(t[5], torch.tensor(expected), rtol=0, atol=1e-7)
    torch.testing.assert_close(t[0], torch.tensor([0.0, 0, 1, 1, 0, 0, 1, 1]))
    assert len({tuple(r.tolist()) for r in sincos_table((8, 8), 192)}) == 64  # every position its own
    with pytest.raises(ValueError, match="multiple of 4"):
        sincos_table((2, 2), 6)


@pytest.mark.parametrize("arch", sorted(SMALL))
def test_every_family_starts_its_grid_table_as_the_sincos_one(arch: str) -> None:
    size, config = SMALL[arch]
    net = ornis.build_model(arch, size=size, config=config)
    assert isinstance(net, SinCosPositions)
    net.init_sincos_positions()
    tables = dict(net.named_parameters())
    table = tables["pos_embedding"] if "pos_embedding" in tables else tables["pos_embed"]
    if table.dim() == 4:  # (1, C, h, w): a background table interpolated to the stem grid; the window's is zero
        _, dim, h, w = table.shape
        torch.testing.assert_close(table[0].flatten(1).T, sincos_table((h, w), dim), rtol=0, atol=0)
        assert tables["pos_embed_win"].abs().max().item() == 0.0
    else:  # (1, [special +] h*w, C): the grid's rows, row-major; a special token's row is zero
        h, w = net.grid_size if hasattr(net, "grid_size") else net.token_grid
        torch.testing.assert_close(table[0, -h * w :], sincos_table((h, w), table.shape[-1]), rtol=0, atol=0)
        assert table[0, : -h * w].abs().sum().item() == 0.0


def test_start_encoder_uses_it_from_scratch_only(tmp_path: Path) -> None:
    size, config = SMALL["vit_t16"]
    fresh = start_encoder(None, "vit_t16", size, config, positions="sincos").encoder
    torch.testing.assert_close(fresh.pos_embedding[0, 1:], sincos_table((8, 8), 192), rtol=0, atol=0)
    torch.manual_seed(0)
    saved = ornis.build_model("vit_t16", size=size, config=config)
    path = ornis.save_model(saved, tmp_path / "net.pt")
    loaded = start_encoder(path, None, positions="sincos").encoder  # a checkpoint keeps what it learned
    assert torch.equal(loaded.pos_embedding, saved.pos_embedding)
    torch.manual_seed(0)
    default = start_encoder(None, "vit_t16", size, config).encoder
    assert torch.equal(default.pos_embedding, saved.pos_embedding)  # "random": the architecture's own init
    with pytest.raises(ValueError, match="positions must be one of random, sincos"):
        start_encoder(None, "vit_t16", size, config, positions="sine")


def test_mae_from_scratch_starts_both_tables_as_sincos() -> None:
    size, config = SMALL["vit_t16"]
    opts = MIMOptions(train=".", arch="vit_t16", size=size, model_config=config, decoder_dim=64, decoder_depth=1)
    mae, _ = build_mae(dataclasses.replace(opts, positions="sincos"))
    torch.testing.assert_close(mae.decoder_pos_embed[0], sincos_table((8, 8), 64), rtol=0, atol=0)
    torch.testing.assert_close(mae.encoder.pos_embedding[0, 1:], sincos_table((8, 8), 192), rtol=0, atol=0)
    mae, _ = build_mae(dataclasses.replace(opts, positions="random"))
    assert 0.015 < mae.decoder_pos_embed.std().item() < 0.025  # "random": std 0.02
    mae, _ = build_mae(opts)  # the default for a ViT: MAE's tables
    torch.testing.assert_close(mae.decoder_pos_embed[0], sincos_table((8, 8), 64), rtol=0, atol=0)


def test_recipe_defaults_and_the_cli_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert DinoV2Options(data=".").positions == "sincos"
    assert MIMOptions(train=".").positions is None and ClassifyOptions(train=".").positions == "random"
    from ornis.cli.main import main

    assert main(["train", "dino-v2", "--help"]) == 0
    assert "(default: sincos)" in " ".join(capsys.readouterr().out.split())
    assert main(["train", "mim", "--help"]) == 0
    assert "(default: the family's MIM paper's: sincos for a ViT (MAE)" in " ".join(capsys.readouterr().out.split())
    assert main(["train", "mim", ".", "--arch", "vit_t16", "-o", "x", "--positions", "sine"]) == 2
    assert "invalid choice: 'sine'" in capsys.readouterr().err
