"""Converters from upstream releases: random-weight reference models (the ``sam2`` package's Hiera trunk,
``transformers``' Dinov2WithRegisters, and the DINOv2 torch-hub layout) converted and compared with ornis, fp32."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from conftest import scale_err
from support.convert import junk_sources, tiny_hub_state

import ornis
from ornis.cli.main import main
from ornis.errors import CheckpointFormatError
from ornis.weights.checkpoint import read_checkpoint
from ornis.weights.convert import convert_dinov2, convert_sam2
from ornis.weights.convert.dinov2 import hub_to_ornis

TOL = 1e-5


def perturb(net: torch.nn.Module, seed: int) -> None:
    """Add N(0, 0.05) to every tensor so that no zero-initialised token, bias or layer scale hides a bug."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.05)


# -- DINOv2 ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hf_dinov2(tmp_path_factory: pytest.TempPathFactory):
    """A small Dinov2WithRegisters (width 128, 2 heads of 64, 2 layers, 224 -> 16x16 patches) saved as a Hugging
    Face folder, and its outputs on a fixed input."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    config = Dinov2WithRegistersConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=224,
        patch_size=14,
        num_register_tokens=4,
    )
    model = Dinov2WithRegistersModel(config).eval()
    perturb(model, 0)
    folder = tmp_path_factory.mktemp("hf") / "dinov2-with-registers-test"
    model.save_pretrained(folder)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        out = model(pixel_values=x, output_hidden_states=True)
    return folder, model, x, out


def check_against_hf(net, x, out) -> dict[str, float]:
    """ornis tokens are [registers, class, patches]; Hugging Face's [class, registers, patches]."""
    with torch.no_grad():
        tokens = net.forward_features(x)
        neck = net.detection_features(x)["neck"]
        emb = net.embedding(x)
    hf = out.last_hidden_state
    ours = torch.cat([tokens[:, 4:5], tokens[:, :4], tokens[:, 5:]], dim=1)
    before_norm = out.hidden_states[-1][:, 5:].transpose(1, 2).reshape(neck.shape)
    return {
        "tokens": scale_err(ours, hf),
        "embedding": scale_err(emb, out.pooler_output),
        "neck": scale_err(neck, before_norm),
    }


def test_dinov2_hf_folder_via_cli(hf_dinov2, tmp_path, capsys):
    folder, _, x, out = hf_dinov2
    dst = tmp_path / "vit_reg4_dinov2-test.pt"
    assert main(["convert", "dinov2", str(folder), "-o", str(dst)]) == 0
    assert "vit_reg4_s14_nps_ls, 224x224" in capsys.readouterr().out
    ckpt = read_checkpoint(dst)
    assert ckpt.network == "vit_reg4_s14_nps_ls"
    assert ckpt.config == {"num_layers": 2, "num_heads": 2, "hidden_dim": 128, "mlp_dim": 512}
    assert ckpt.rgb_stats["mean"] == (0.485, 0.456, 0.406)
    net, _info = ornis.load_pretrained_model(dst, inference=True)
    errs = check_against_hf(net, x, out)
    assert max(errs.values()) < TOL, errs


def hf_to_hub_names(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official torch-hub layout, written from its published key names (independently of the converter)."""
    hub = {
        "cls_token": hf_state["embeddings.cls_token"],
        "register_tokens": hf_state["embeddings.register_tokens"],
        "pos_embed": hf_state["embeddings.position_embeddings"],
        "mask_token": hf_state["embeddings.mask_token"].reshape(1, -1),
        "patch_embed.proj.weight": hf_state["embeddings.patch_embeddings.projection.weight"],
        "patch_embed.proj.bias": hf_state["embeddings.patch_embeddings.projection.bias"],
        "norm.weight": hf_state["layernorm.weight"],
        "norm.bias": hf_state["layernorm.bias"],
    }
    for i in range(2):
        p = f"encoder.layer.{i}."
        for leaf in ("weight", "bias"):
            q, k, v = (hf_state[f"{p}attention.attention.{n}.{leaf}"] for n in ("query", "key", "value"))
            hub[f"blocks.{i}.attn.qkv.{leaf}"] = torch.cat([q, k, v])
            hub[f"blocks.{i}.attn.proj.{leaf}"] = hf_state[f"{p}attention.output.dense.{leaf}"]
            for n in ("norm1", "norm2", "mlp.fc1", "mlp.fc2"):
                hub[f"blocks.{i}.{n}.{leaf}"] = hf_state[f"{p}{n}.{leaf}"]
        hub[f"blocks.{i}.ls1.gamma"] = hf_state[f"{p}layer_scale1.lambda1"]
        hub[f"blocks.{i}.ls2.gamma"] = hf_state[f"{p}layer_scale2.lambda1"]
    return hub


def test_dinov2_torch_hub_state_dict(hf_dinov2, tmp_path):
    from safetensors.torch import load_file

    folder, _, x, out = hf_dinov2
    hub = hf_to_hub_names(load_file(folder / "model.safetensors"))
    assert len(hub) == 8 + 2 * 14
    src = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(hub, src)
    dst = convert_dinov2(src, tmp_path / "converted.safetensors")
    net, _ = ornis.load_pretrained_model(dst, inference=True)
    errs = check_against_hf(net, x, out)
    assert max(errs.values()) < TOL, errs
    # The class token's position embedding is folded into the token: no row for it is left
    assert net.pos_embedding.shape == (1, 256, 128)
    assert torch.equal(net.class_token, hub["cls_token"] + hub["pos_embed"][:, :1])


def test_dinov2_large_maps_to_the_published_architecture():
    """ViT-L/14 reg4 at 518 (the published model's source), shapes only: no config override, 37x37 grid."""
    d, layers = 1024, 24
    with torch.device("meta"):
        hub = {
            "cls_token": torch.empty(1, 1, d),
            "register_tokens": torch.empty(1, 4, d),
            "pos_embed": torch.empty(1, 1 + 37 * 37, d),
            "mask_token": torch.empty(1, d),
            "patch_embed.proj.weight": torch.empty(d, 3, 14, 14),
            "patch_embed.proj.bias": torch.empty(d),
            "norm.weight": torch.empty(d),
            "norm.bias": torch.empty(d),
        }
        for i in range(layers):
            for n, shape in {
                "norm1": (d,),
                "norm2": (d,),
                "attn.qkv": (3 * d, d),
                "attn.proj": (d, d),
                "mlp.fc1": (4 * d, d),
                "mlp.fc2": (d, 4 * d),
            }.items():
                hub[f"blocks.{i}.{n}.weight"] = torch.empty(*shape)
                hub[f"blocks.{i}.{n}.bias"] = torch.empty(shape[0])
            hub[f"blocks.{i}.ls1.gamma"] = torch.empty(d)
            hub[f"blocks.{i}.ls2.gamma"] = torch.empty(d)
        state, network, size, overrides = hub_to_ornis(hub)
        net = ornis.build_model(network, size=size)
    assert (network, size, overrides) == ("vit_reg4_l14_nps_ls", (518, 518), {})
    own = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    assert own == {k: tuple(v.shape) for k, v in state.items()}
    assert sum(v.numel() for v in state.values()) == pytest.approx(304.4e6, rel=1e-3)


def test_dinov2_rejects_foreign_state_dict(tmp_path):
    src = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(2, 3)}, src)
    with pytest.raises(CheckpointFormatError, match="not a DINOv2 state dict: missing cls_token"):
        convert_dinov2(src, tmp_path / "x.pt")


# -- SAM 2 -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sam2_converted(tmp_path_factory: pytest.TempPathFactory):
    """The SAM 2.1 Hiera-S trunk with random weights, saved as a SAM 2 checkpoint (with other parts of the model
    beside it), converted through the CLI and loaded by ornis."""
    from sam2.modeling.backbones.hieradet import Hiera

    trunk = Hiera(
        embed_dim=96,
        num_heads=1,
        stages=(1, 2, 11, 2),
        global_att_blocks=(7, 10, 13),
        window_pos_embed_bkg_spatial_size=(7, 7),
    ).eval()  # sam2.1_hiera_s.yaml
    perturb(trunk, 2)
    model = {f"image_encoder.trunk.{k}": v for k, v in trunk.state_dict().items()}
    model["image_encoder.neck.convs.0.conv.weight"] = torch.zeros(256, 768, 1, 1)
    model["sam_mask_decoder.iou_token.weight"] = torch.zeros(1, 256)
    root = tmp_path_factory.mktemp("sam2")
    src = root / "sam2.1_hiera_small.pt"
    torch.save({"model": model}, src)
    dst = root / "hieradet_small_sam2_1-test.pt"
    assert main(["convert", "sam2", str(src), "-o", str(dst)]) == 0
    net, info = ornis.load_pretrained_model(dst, inference=True)
    return trunk, net, info, dst


def _compare_sam2(trunk, net, size: int) -> list[float]:
    torch.manual_seed(size)
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        ref = trunk(x)
        ours = net.detection_features(x)
    assert list(ours) == ["stage1", "stage2", "stage3", "stage4"]
    assert [tuple(t.shape) for t in ours.values()] == [tuple(t.shape) for t in ref]
    return [scale_err(o, r) for o, r in zip(ours.values(), ref)]


def test_sam2_file_facts(sam2_converted):
    _, net, info, dst = sam2_converted
    ckpt = read_checkpoint(dst)
    assert ckpt.network == "hieradet_small" and ckpt.config is None
    assert ornis.get_size_from_signature(info.signature) == (1024, 1024)
    assert info.rgb_stats["std"] == (0.229, 0.224, 0.225)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(33.9e6, rel=2e-3)


@pytest.mark.parametrize("size", [224, 512])
def test_sam2_trunk_parity(sam2_converted, size):
    trunk, net, _, _ = sam2_converted
    errs = _compare_sam2(trunk, net, size)
    assert max(errs) < TOL, errs


@pytest.mark.slow
def test_sam2_trunk_parity_1024(sam2_converted):
    trunk, net, _, _ = sam2_converted
    errs = _compare_sam2(trunk, net, 1024)
    assert max(errs) < TOL, errs


def test_sam2_rejects_checkpoint_without_trunk(tmp_path):
    src = tmp_path / "sam2.pt"
    torch.save({"model": {"sam_mask_decoder.iou_token.weight": torch.zeros(1, 4)}}, src)
    with pytest.raises(CheckpointFormatError, match="no SAM 2 image-encoder trunk"):
        convert_sam2(src, tmp_path / "x.pt")


# -- safety ------------------------------------------------------------------------------------------------------
class Payload:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_converters_refuse_to_unpickle_objects(tmp_path, capsys):
    src = tmp_path / "evil.pt"
    torch.save({"model": {"x": torch.zeros(1)}, "extra": Payload()}, src)
    for convert in (convert_sam2, convert_dinov2):
        with pytest.raises(CheckpointFormatError, match="refused to unpickle"):
            convert(src, tmp_path / "x.pt")
    assert "unpickled!" not in capsys.readouterr().out


def test_every_torch_load_in_ornis_is_weights_only():
    """No file is ever loaded with full unpickling: each torch.load call in the package passes weights_only=True."""
    root = Path(ornis.__file__).parent
    calls = []
    for path in root.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(", text):
            depth, end = 0, m.end() - 1
            for end in range(m.end() - 1, len(text)):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                if depth == 0:
                    break
            calls.append((path.relative_to(root), text[m.start() : end + 1]))
    assert calls, "expected torch.load calls in ornis"
    unsafe = [(str(p), c) for p, c in calls if "weights_only=True" not in c]
    assert unsafe == []


# -- bad input ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("converter", [convert_sam2, convert_dinov2], ids=["sam2", "dinov2"])
def test_converters_on_junk_raise_one_typed_error(tmp_path, converter):
    """A text file once ended in `IndexError: pop from empty list` / `KeyError: 101`, a partial state dict in
    `ValueError: max() arg is an empty sequence`: every one is now a CheckpointFormatError naming the file."""
    for kind, src in junk_sources(tmp_path).items():
        with pytest.raises(CheckpointFormatError) as e:
            converter(src, tmp_path / "out.pt")
        assert e.value.path == src, kind
        assert str(e.value).startswith(f"{src}: "), kind
        assert "\n" not in str(e.value) and "weights_only" not in str(e.value), kind
    assert not (tmp_path / "out.pt").exists()


def test_dinov2_folder_with_a_broken_config(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointFormatError, match=r"not a DINOv2 checkpoint this converter can read \(JSONDecode"):
        convert_dinov2(folder, tmp_path / "out.pt")
    (folder / "config.json").write_text("{}")
    torch.save({"embeddings.cls_token": torch.zeros(1, 1, 8)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointFormatError, match=r"\(KeyError: 'num_attention_heads'\)"):
        convert_dinov2(folder, tmp_path / "out.pt")


def test_converter_arguments_are_checked_before_reading(tmp_path):
    text = tmp_path / "text.pt"
    text.write_text("not a checkpoint")
    (tmp_path / "outdir").mkdir()
    for convert in (convert_sam2, convert_dinov2):
        with pytest.raises(IsADirectoryError, match="a folder; expected the name of the .pt or .safetensors file"):
            convert(text, tmp_path / "outdir")
    with pytest.raises(ValueError, match=r"size must be a positive multiple of 32 \(HieraDet's stride\), found 100"):
        convert_sam2(text, tmp_path / "x.pt", size=100)
    with pytest.raises(ValueError, match=r"num_heads must be a positive integer, found 0"):
        convert_dinov2(text, tmp_path / "x.pt", num_heads=0)
    with pytest.raises(ornis.UnknownModelError, match="hieradet_smal"):
        convert_sam2(text, tmp_path / "x.pt", network="hieradet_smal")


def test_cli_convert_junk_is_one_line(tmp_path, capsys):
    text = tmp_path / "notes.txt"
    text.write_text("hello\n")
    for source in ("sam2", "dinov2"):
        assert main(["convert", source, str(text), "-o", str(tmp_path / "x.pt")]) == 1
        err = capsys.readouterr().err
        why = "not a torch.save file (neither a zip archive nor a pickle); truncated, or another kind of file?"
        assert err == f"ornis: error: {text}: {why}\n"
    assert main(["convert", "sam2", str(text), "-o", str(tmp_path / "x.pt"), "--size", "0"]) == 2
    assert "argument --size: 0 must be at least 1" in capsys.readouterr().err
    assert main(["convert", "dinov2", str(text), "-o", str(tmp_path / "x.pt"), "--num-heads", "-1"]) == 2
    assert "argument --num-heads: -1 must be at least 1" in capsys.readouterr().err


def test_converted_file_mode_follows_the_umask(tmp_path):
    src = tmp_path / "dinov2_tiny_reg4.pth"
    torch.save(tiny_hub_state(), src)
    old = os.umask(0o022)
    try:
        dst = convert_dinov2(src, tmp_path / "vit_tiny.pt")
    finally:
        os.umask(old)
    assert dst.stat().st_mode & 0o777 == 0o644
    net, _ = ornis.load_pretrained_model(dst)
    assert net.name == "vit_reg4_s14_nps_ls" and sum(p.numel() for p in net.parameters()) > 0
