"""``ornis train mim``: MAE-style masked image modelling on a plain ViT (token omission) and on Hiera (mask units),
on an unlabelled nested folder: the loss by hand, learning, exact resume, continuing a checkpoint, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.training import STATS, TINY_VIT, make_shapes

import ornis
from ornis.models.layers import sincos_table
from ornis.train.config import TrainConfig
from ornis.train.mim import (
    MaskedAutoencoder,
    MIMOptions,
    build_mae,
    mim_positions,
    normalized_pixel_loss,
    patchify,
    random_unit_mask,
    train_mim,
    units_to_tokens,
)

TINY_HIERA = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1, drop_path_rate=0.0)
DECODER = dict(decoder_dim=64, decoder_depth=1, decoder_heads=2)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def photos_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The user's own photos: no class folders, no label file, images at several depths."""
    return make_shapes(tmp_path_factory.mktemp("mim") / "my photos", per_class=12, labelled=False)


def test_masks_patches_and_loss_by_hand():
    torch.manual_seed(0)
    mask = random_unit_mask(5, 16, 0.75, torch.device("cpu"))
    assert mask.shape == (5, 16) and mask.sum(dim=1).tolist() == [12] * 5
    assert not torch.equal(mask[0], mask[1])
    with pytest.raises(ValueError, match="hide"):
        random_unit_mask(1, 4, 0.1, torch.device("cpu"))
    # a 2x2 unit grid of 2x2-token units: unit (0, 1) covers tokens (0, 2), (0, 3), (1, 2), (1, 3) of the 4x4 grid
    units = torch.tensor([[False, True, False, False]])
    tokens = units_to_tokens(units, (2, 2), 2).view(4, 4)
    expected = torch.zeros(4, 4, dtype=torch.bool)
    expected[0:2, 2:4] = True
    assert torch.equal(tokens, expected)
    # patchify: patch (row 1, col 0) of a 2-patch-wide image, pixel (py=1, px=0), channel 2
    img = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).view(2, 3, 4, 4)
    p = patchify(img, 2)
    assert p.shape == (2, 4, 12)
    assert p[1, 2, (1 * 2 + 0) * 3 + 2] == img[1, 2, 2 + 1, 0 + 0]
    # the loss: per-patch normalised target, mean over pixels, mean over hidden patches only
    pred = torch.randn(2, 4, 12)
    token_mask = torch.tensor([[True, False, False, True], [False, False, True, False]])
    target = p.clone()
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    by_hand = torch.stack([((pred[b, i] - target[b, i]) ** 2).mean() for b, i in [(0, 0), (0, 3), (1, 2)]]).mean()
    assert float(normalized_pixel_loss(pred, img, token_mask, 2)) == pytest.approx(float(by_hand), rel=1e-6)
    assert float(normalized_pixel_loss(target, img, token_mask, 2)) < 1e-10
    raw = torch.stack([((pred[b, i] - p[b, i]) ** 2).mean() for b, i in [(0, 0), (0, 3), (1, 2)]]).mean()
    assert float(normalized_pixel_loss(pred, img, token_mask, 2, norm_pix=False)) == pytest.approx(float(raw), rel=1e-6)


def test_encoder_sees_only_the_visible_tokens():
    """The ViT path must not depend on hidden patches: changing their pixels leaves the visible tokens' encoding
    exactly as it was; on Hiera the hidden units are zeroed before the stem, so the same holds."""
    from ornis.models import build_model

    torch.manual_seed(0)
    for net, size in (
        (build_model("vit_t16", size=32, config=TINY_VIT), 32),
        (build_model("hiera_abswin_tiny", size=64, config=TINY_HIERA), 64),
    ):
        mae = MaskedAutoencoder(net, **DECODER, mask_ratio=0.5).eval()
        units = mae.units_grid
        unit_mask = random_unit_mask(2, units[0] * units[1], 0.5, torch.device("cpu"))
        token_mask = units_to_tokens(unit_mask, units, mae.mask_unit)
        x = torch.randn(2, 3, size, size)
        # scribble over the first hidden cell's pixels (a Hiera cell is 2 x 2 decoder positions)
        g = mae.cells[1]
        p = mae.pixel_patch * mae.side
        y = x.clone()
        for b in range(2):
            i = int(token_mask[b].nonzero()[0])
            y[b, :, (i // g) * p : (i // g + 1) * p, (i % g) * p : (i % g + 1) * p] += 5.0
        with torch.no_grad():
            a, c = mae.encode_visible(x, token_mask), mae.encode_visible(y, token_mask)
        assert a.shape[1] == mae.special_tokens + int((~token_mask[0]).sum()) * mae.side**2
        assert torch.allclose(a, c, atol=1e-6), net.name


def test_positions_start_as_the_family_paper_says():
    """From scratch, a ViT starts MAE's sine-cosine tables (encoder and decoder), Hiera its own random table, as
    Hiera-MAE; ``positions`` given by hand wins."""
    assert (mim_positions("vit_t16"), mim_positions("hiera_tiny"), mim_positions(None)) == (
        "sincos",
        "random",
        "random",
    )
    torch.manual_seed(0)
    opts = MIMOptions(train="unused", arch="vit_t16", size=32, model_config=TINY_VIT, **DECODER)
    mae, _ = build_mae(opts)
    grid, width = mae.grid, mae.encoder.embedding_size
    torch.testing.assert_close(mae.decoder_pos_embed[0], sincos_table(grid, DECODER["decoder_dim"]))
    torch.testing.assert_close(mae.encoder.pos_embedding[0, -grid[0] * grid[1] :], sincos_table(grid, width))
    plain, _ = build_mae(MIMOptions(**{**opts.__dict__, "positions": "random"}))
    assert not torch.allclose(plain.encoder.pos_embedding[0, -grid[0] * grid[1] :], sincos_table(grid, width))


def test_pretraining_runs_without_stochastic_depth_and_the_checkpoint_keeps_the_rates(tmp_path, photos_folder):
    """MAE and Hiera-MAE pretrain without stochastic depth: every DropPath of the encoder is the identity unless
    ``model_config`` names ``drop_path_rate``; the architecture's config is untouched, so the written checkpoint
    rebuilds with its own rates (0.1 for Hiera) for fine-tuning."""
    from ornis.models.layers import DropPath

    def rates(model: torch.nn.Module) -> list[float]:
        return [m.p for m in model.modules() if isinstance(m, DropPath)]

    depths = dict(depths=(1, 1, 1, 1), embed_dim=16, num_heads=1)  # hiera's registered drop_path_rate: 0.1
    opts = MIMOptions(train=photos_folder, arch="hiera_abswin_tiny", size=64, model_config=depths, **DECODER)
    mae, _ = build_mae(opts)
    assert len(rates(mae.encoder)) == 4 and set(rates(mae.encoder)) == {0.0}
    assert mae.encoder.config.drop_path_rate == pytest.approx(0.1)
    given, _ = build_mae(MIMOptions(**{**opts.__dict__, "model_config": {**depths, "drop_path_rate": 0.3}}))
    assert max(rates(given.encoder)) == pytest.approx(0.3)
    cfg = TrainConfig(steps=1, batch_size=4, output_dir=tmp_path, log_every=0)
    net, _ = ornis.load_pretrained_model(train_mim(opts, cfg).checkpoint)
    assert max(rates(net)) == pytest.approx(0.1)


def test_the_decoder_reads_the_class_token():
    """As in MAE, a ViT's class token joins the decoder: the loss depends on the class token's final output (which
    nothing else trains) and its gradient reaches it, while the decoder's position table covers the cells only."""
    from ornis.models import build_model

    torch.manual_seed(0)
    net = build_model("vit_t16", size=32, config=TINY_VIT)
    mae = MaskedAutoencoder(net, **DECODER, mask_ratio=0.75).eval()
    assert mae.special_tokens == net.num_special_tokens == 1
    assert mae.decoder_pos_embed.shape[1] == mae.grid[0] * mae.grid[1]
    units = mae.units_grid
    unit_mask = random_unit_mask(2, units[0] * units[1], 0.75, torch.device("cpu"))
    x = torch.randn(2, 3, 32, 32)
    shift = torch.zeros(1, 1, net.embedding_size, requires_grad=True)

    def nudge_class_token(module, args, out):  # the final norm's output: class token first
        return torch.cat([out[:, :1] + shift, out[:, 1:]], dim=1)

    handle = net.norm.register_forward_hook(nudge_class_token)
    loss, _ = mae(x, unit_mask)
    loss.backward()
    assert float(shift.grad.abs().sum()) > 0
    with torch.no_grad():
        shift.fill_(1.0)
        moved, _ = mae(x, unit_mask)
    handle.remove()
    assert abs(float(moved) - float(loss.detach())) > 1e-4


@pytest.mark.parametrize("arch", ["vit", "hiera"])
def test_loss_goes_down_on_an_unlabelled_folder(tmp_path, photos_folder, arch):
    if arch == "vit":
        opts = MIMOptions(
            train=photos_folder, arch="vit_t16", size=32, model_config=TINY_VIT, mask_ratio=0.5, **DECODER
        )
    else:
        opts = MIMOptions(
            train=photos_folder, arch="hiera_abswin_tiny", size=64, model_config=TINY_HIERA, mask_ratio=0.5, **DECODER
        )
    cfg = TrainConfig(steps=24, batch_size=12, lr=3e-3, warmup_steps=3, output_dir=tmp_path, log_every=0)
    result = train_mim(opts, cfg)
    losses = [result.losses[s] for s in range(24)]
    first, last = sum(losses[:3]) / 3, sum(losses[-6:]) / 6
    assert last < 0.85 * first, losses  # measured: ViT 1.39 -> 0.75, Hiera 1.03 -> 0.76
    # acceptance 5: the encoder alone, in the published format, loads by path and embeds
    net, info = ornis.load_pretrained_model(result.checkpoint, inference=True)
    assert net.num_classes == 0 and info.class_to_idx == {}
    size = net.size[0]
    emb = net.embedding(torch.randn(2, 3, size, size))
    assert emb.shape == (2, net.embedding_size) and torch.isfinite(emb).all()
    assert not any(k.startswith("decoder") for k in ornis.read_checkpoint(result.checkpoint).state)
    if arch == "hiera":  # and `ornis embed` uses the file directly
        import pyarrow.parquet as pq

        from ornis.cli.main import main

        options = "--workers 0 --device cpu --no-progress"
        embed = [
            "embed",
            "-m",
            str(result.checkpoint),
            str(photos_folder),
            "-o",
            str(tmp_path / "emb"),
            *options.split(),
        ]
        assert main(embed) == 0
        table = pq.read_table(tmp_path / "emb" / "part-00000.parquet")
        assert table.num_rows == 36 and table.schema.field("embedding").type.list_size == net.embedding_size


def test_resume_gives_the_same_losses_and_continue_from_a_checkpoint(tmp_path, photos_folder):
    from ornis.models import build_model

    torch.manual_seed(0)
    pre = build_model("hiera_abswin_tiny", num_classes=4, size=64, config=TINY_HIERA)
    start = ornis.save_model(pre, tmp_path / "released.pt", rgb_stats=STATS, config=TINY_HIERA)
    opts = MIMOptions(train=photos_folder, weights=start, mask_ratio=0.5, **DECODER)
    kw = dict(steps=6, batch_size=6, lr=1e-3, warmup_steps=1, log_every=0, grad_accum=2)
    full = train_mim(opts, TrainConfig(output_dir=tmp_path / "a", **kw))
    train_mim(opts, TrainConfig(output_dir=tmp_path / "b", stop_at=2, **kw))
    rest = train_mim(opts, TrainConfig(output_dir=tmp_path / "b", resume=True, seed=0, **kw))
    assert sorted(rest.losses) == [2, 3, 4, 5]
    assert max(abs(rest.losses[s] - full.losses[s]) for s in rest.losses) <= 1e-6
    net, info = ornis.load_pretrained_model(full.checkpoint)
    assert net.name == "hiera_abswin_tiny" and info.rgb_stats == {k: list(v) for k, v in STATS.items()}
    old, new = pre.state_dict(), net.state_dict()
    drift = max(float((old[k] - new[k]).abs().max()) for k in new)
    assert 0 < drift < 0.05  # continued from the file's weights


def test_cli_train_mim(tmp_path, photos_folder):
    from ornis.cli.main import main

    options = "--arch vit_t16 --size 32 --mask-ratio 0.5 --mask-unit 2 --decoder-dim 32 --decoder-depth 1"
    more = "--decoder-heads 2 --steps 2 --batch-size 4 --workers 0 --log-every 1 --device cpu"
    code = main(
        ["train", "mim", str(photos_folder), *options.split(), *more.split()]
        + ["--model-config", json.dumps(TINY_VIT), "-o", str(tmp_path)]
    )
    assert code == 0
    assert (tmp_path / "vit_t16_mim.pt").is_file() and (tmp_path / "vit_t16_mim_s2_states.pt").is_file()
    states = torch.load(tmp_path / "vit_t16_mim_s2_states.pt", weights_only=True)
    assert any(k.startswith("decoder_blocks.") for k in states["model"])  # the decoder is kept for resuming
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log] == [1, 2] and all(0 < e["loss"] < 10 for e in log)


@pytest.mark.parametrize("arch", ["vit", "hiera"])
def test_mae_step_has_no_host_sync_and_matches_boolean_indexing(arch):
    """The MAE forward traces to one graph (no ``nonzero`` / ``tolist`` waiting for the device), and placing the
    visible tokens by scatter gives exactly what boolean indexing gave."""
    from ornis.models import build_model

    torch.manual_seed(0)
    net, size = (
        (build_model("vit_t16", size=32, config=TINY_VIT), 32)
        if arch == "vit"
        else (build_model("hiera_abswin_tiny", size=64, config=TINY_HIERA), 64)
    )
    mae = MaskedAutoencoder(net, **DECODER, mask_ratio=0.6).eval()
    units = mae.units_grid
    unit_mask = random_unit_mask(2, units[0] * units[1], 0.6, torch.device("cpu"))
    x = torch.randn(2, 3, size, size)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(mae)(x, unit_mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    with torch.no_grad():
        loss, token_mask = mae(x, unit_mask)
        cell_mask = units_to_tokens(unit_mask, units, mae.mask_unit)
        encoded = mae.decoder_embed(mae.encode_visible(x, cell_mask))
        s, side, (gh, gw) = mae.special_tokens, mae.side, mae.cells
        visible = encoded[:, s:]
        D = visible.shape[-1]
        # each cell's side x side positions, placed by boolean indexing on the cell grid, then laid out row-major
        cells = mae.mask_token.expand(2, gh * gw * side * side, -1).reshape(2, gh * gw, side, side, D).clone()
        cells[~cell_mask] = visible.reshape(-1, side, side, D)
        full = cells.view(2, gh, gw, side, side, D).permute(0, 1, 3, 2, 4, 5).reshape(2, -1, D)
        assert torch.equal(token_mask, units_to_tokens(unit_mask, units, mae.mask_unit * side))
        h = torch.cat([encoded[:, :s], full + mae.decoder_pos_embed], dim=1)
        for blk in mae.decoder_blocks:
            h = blk(h)
        pred = mae.decoder_pred(mae.decoder_norm(h[:, s:]))
        expected = normalized_pixel_loss(pred, x, token_mask, mae.pixel_patch, mae.norm_pix)
    assert float(loss) == float(expected)


def test_hiera_mae_matches_the_upstream_hiera_mae():
    """Hiera-MAE as published (hiera-transformer 0.1.4's ``MaskedAutoencoderHiera``, ``q_pool=2``): the same random
    weights and mask give the same fused encoder output and the same loss. The encoder pools once fewer than the
    backbone (its last stage at stride 16), so the decoder has 2 x 2 positions a mask unit, each predicting 16 x 16
    pixels."""
    from hiera.hiera_mae import MaskedAutoencoderHiera

    from ornis.models import build_model

    stages = (1, 1, 2, 1)
    torch.manual_seed(0)
    net = build_model("hiera_tiny", size=96, config=dict(depths=stages, embed_dim=16, num_heads=1, drop_path_rate=0.0))
    mae = MaskedAutoencoder(net, decoder_dim=32, decoder_depth=2, decoder_heads=2, mask_ratio=0.6).eval()
    assert (mae.cells, mae.grid, mae.pixel_patch) == ((3, 3), (6, 6), 16)
    ref = MaskedAutoencoderHiera(
        input_size=(96, 96), embed_dim=16, num_heads=1, stages=stages, q_pool=2,
        decoder_embed_dim=32, decoder_depth=2, decoder_num_heads=2,
    ).eval()  # fmt: skip
    with torch.no_grad():
        for p in mae.parameters():
            p.normal_(0.0, 0.05)
    ours = {n: p for n, p in mae.named_parameters() if not n.startswith("encoder.features.")}  # unused by MAE
    ends = [sum(stages[: i + 1]) for i in range(len(stages))]
    names = {}
    for name, _ in ref.named_parameters():
        mine = name.replace("patch_embed.", "encoder.stem.").replace("mlp.fc1", "mlp.0").replace("mlp.fc2", "mlp.3")
        mine = mine.replace("multi_scale_fusion_heads", "fusion_heads")
        if name.startswith("blocks."):
            i = int(name.split(".")[1])
            stage = next(s for s, end in enumerate(ends) if i < end)
            j = i - (ends[stage - 1] if stage else 0)
            mine = f"encoder.body.stage{stage + 1}.{j}." + mine.split(".", 2)[2]
        elif name == "pos_embed":
            mine = "encoder.pos_embed"
        names[name] = mine
    assert sorted(names.values()) == sorted(ours)  # every parameter on both sides, once
    weights = {name: ours[mine].detach() for name, mine in names.items()}
    for name in ("decoder_pred.weight", "decoder_pred.bias"):  # its pixels in (c, y, x) order where ours are (y, x, c)
        w = weights[name]
        weights[name] = w.view(16, 16, 3, -1).permute(2, 0, 1, 3).reshape(w.shape)
    ref.load_state_dict(weights)

    x = torch.randn(2, 3, 96, 96)
    unit_mask = random_unit_mask(2, 9, 0.6, torch.device("cpu"))  # True = hidden; the reference's True = visible
    with torch.no_grad():
        latent, _ = ref.forward_encoder(x, 0.6, mask=~unit_mask)
        ref_loss = ref(x, mask=~unit_mask)[0]
        encoded = mae.encode_visible(x, unit_mask)
        loss, token_mask = mae(x, unit_mask)
    assert latent.shape == (2, 4, 2, 2, 128) and encoded.shape == (2, 16, 128)  # 4 visible units, 2 x 2 each
    torch.testing.assert_close(encoded, latent.reshape(2, 16, 128), rtol=0, atol=1e-5)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-5)
    assert int(token_mask.sum()) == 2 * 5 * 4  # 5 hidden units a row, 4 positions each
