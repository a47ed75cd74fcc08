"""The ViT family against the reference (Birder 0.8.4): parameter counts and fp32 parity on real photos."""

from __future__ import annotations

import pytest
import torch
from conftest import RGB_STATS, birder_checkpoint, scale_err

import ornis
from ornis.inference.classification import infer_image

TOL = 1e-5  # max |ours - reference| relative to the reference's scale, fp32


def n_params(name: str, size: int, num_classes: int) -> float:
    with torch.device("meta"):
        net = ornis.build_model(name, num_classes=num_classes, size=size)
    return sum(p.numel() for p in net.parameters()) / 1e6


def test_parameter_counts_match_the_cards() -> None:
    assert round(n_params("vit_reg4_l14_nps_ls", 518, 0), 1) == 304.4
    assert round(n_params("flexivit_reg1_s16_rms_ls", 240, 550), 1) == 21.9


def test_registry_lists_sizes_and_families() -> None:
    names = ornis.list_models()
    for name in ("vit_reg4_l14_nps_ls", "flexivit_reg1_s16_rms_ls", "vit_s16", "vit_b14", "vit_reg4_b14_nps_ls"):
        assert name in names
    assert ornis.list_models("flexivit_reg1_*") == sorted(n for n in names if n.startswith("flexivit_reg1_"))
    with pytest.raises(ornis.UnknownModelError, match="flexivit_reg1_s16_rms_ls"):
        ornis.build_model("flexivit_reg1_s16_rms_lss")


@pytest.fixture(scope="module")
def flexivit(tmp_path_factory):
    """Reference FlexiViT at its real config (550 classes, 240 px) and ours loaded from the same file."""
    path = tmp_path_factory.mktemp("ckpt") / "flexivit_reg1_s16_rms_ls_test.pt"
    ref = birder_checkpoint("flexivit_reg1_s16_rms_ls", path, 240, 550)
    net, info = ornis.load_pretrained_model(path, inference=True)
    return ref, net, info


@pytest.fixture(scope="module")
def vit_nps(tmp_path_factory):
    """A small "nps" ViT with 4 registers and layer scale (the ViT-L/14 DINOv2 layout at S size)."""
    path = tmp_path_factory.mktemp("ckpt") / "vit_reg4_s14_nps_ls_test.pt"
    ref = birder_checkpoint("vit_reg4_s14_nps_ls", path, 224, 10)
    net, info = ornis.load_pretrained_model(path, inference=True)
    return ref, net, info


def test_model_info_and_network_identification(flexivit) -> None:
    _, net, info = flexivit
    assert net.name == "flexivit_reg1_s16_rms_ls"
    assert ornis.get_size_from_signature(info.signature) == (240, 240)
    assert len(info.class_to_idx) == 550 and info.rgb_stats == RGB_STATS
    assert not net.training and not any(p.requires_grad for p in net.parameters())


@pytest.mark.parametrize("model", ["flexivit", "vit_nps"])
def test_parity_on_photos(model, request, photos) -> None:
    ref, net, info = request.getfixturevalue(model)
    size = ornis.get_size_from_signature(info.signature)
    transform = ornis.classification_transform(size, info.rgb_stats)
    x = torch.stack([transform(ornis.inference.classification.open_rgb(p)) for p in photos[:2]])
    with torch.no_grad():
        assert scale_err(net(x), ref(x)) < TOL
        assert scale_err(net.embedding(x), ref.embedding(x)) < TOL
        ours, theirs = net.detection_features(x), ref.detection_features(x)
        # The cards name a plain ViT's map "neck"; the reference 0.8.4 calls it "stage1"
        grid = [s // net.patch_size for s in size]
        assert list(ours) == ["neck"] and ours["neck"].shape == (2, net.embedding_size, *grid)
        assert scale_err(ours["neck"], theirs["stage1"]) < TOL
    for photo in photos[:2]:
        out, emb = infer_image(net, photo, transform, return_embedding=True)
        with torch.no_grad():
            r = ref.embedding(transform(ornis.inference.classification.open_rgb(photo)).unsqueeze(0))
            r_out = torch.softmax(ref.classify(r), dim=1)
        assert out.dtype == emb.dtype == "float32"
        assert scale_err(torch.from_numpy(emb), r) < TOL and scale_err(torch.from_numpy(out), r_out) < TOL


def test_flexivit_patch_size_24(flexivit, photos) -> None:
    ref, net, info = flexivit
    transform = ornis.classification_transform((240, 240), info.rgb_stats)
    out, _ = infer_image(net, photos[0], transform, patch_size=24)
    x = transform(ornis.inference.classification.open_rgb(photos[0])).unsqueeze(0)
    with torch.no_grad():
        expected = torch.softmax(ref(x, patch_size=24), dim=1)
        assert scale_err(torch.from_numpy(out), expected) < TOL
        # 240 / 24 = 10: the feature map follows the patch size
        assert net.detection_features(x, patch_size=24)["neck"].shape == (1, 384, 10, 10)
        # Not a no-op: another patch size gives other logits
        assert scale_err(net(x, patch_size=24), ref(x)) > 1e-3  # 100x the parity tolerance


@pytest.mark.parametrize("hw", [(224, 336), (336, 224), (280, 280)])
def test_other_and_non_square_sizes_per_call(vit_nps, hw) -> None:
    """Position embeddings interpolated per call exactly as the reference's dynamic-size mode."""
    ref, net, _ = vit_nps
    ref.set_dynamic_size()
    x = torch.randn(1, 3, *hw, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert scale_err(net.embedding(x), ref.embedding(x)) < TOL
        neck = net.detection_features(x)["neck"]
        assert neck.shape == (1, 384, hw[0] // 14, hw[1] // 14)
        assert scale_err(neck, ref.detection_features(x)["stage1"]) < TOL


def test_new_size_matches_reference_adjust_size(tmp_path) -> None:
    path = tmp_path / "vit_reg4_s14_nps_ls_x.pt"
    ref = birder_checkpoint("vit_reg4_s14_nps_ls", path, 224, 0)
    ref.adjust_size((280, 252))
    net, info = ornis.load_pretrained_model(path, inference=True, new_size=(280, 252))
    assert net.size == (280, 252) and ornis.get_size_from_signature(info.signature) == (224, 224)
    x = torch.randn(2, 3, 280, 252, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert scale_err(net.embedding(x), ref.embedding(x)) < TOL


def test_plain_vit_with_pos_embedded_special_tokens(tmp_path) -> None:
    """Non-nps layout (class and register tokens carry position embeddings), at a non-square size."""
    path = tmp_path / "vit_reg1_s16_test.pt"
    ref = birder_checkpoint("vit_reg1_s16", path, 224, 7)
    net, _ = ornis.load_pretrained_model(path, inference=True)
    ref.set_dynamic_size()
    x = torch.randn(2, 3, 192, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert scale_err(net(x), ref(x)) < TOL


def test_forward_intermediates(vit_nps) -> None:
    _, net, _ = vit_nps
    x = torch.randn(2, 3, 224, 280, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        feats = net.forward_intermediates(x, indices=[2, -1])
        tokens = net.forward_features(x)
        neck = net.detection_features(x)["neck"]
    assert list(feats.maps) == ["block2", "block11"]
    assert all(m.shape == (2, 384, 16, 20) for m in feats.maps.values())
    assert torch.equal(feats.maps["block11"], neck)
    # Token layout: [4 registers, class, 16*20 patches]
    assert tokens.shape == (2, 4 + 1 + 320, 384)
    assert torch.equal(feats.register_tokens, tokens[:, :4]) and torch.equal(feats.cls_token, tokens[:, 4])
    assert torch.equal(feats.embedding, feats.cls_token)
    assert torch.equal(feats.patch_tokens, tokens[:, 5:].transpose(1, 2).reshape(2, 384, 16, 20))
    assert len(net.forward_intermediates(x, indices=3).maps) == 3
    with pytest.raises(ValueError, match="out of range"):
        net.forward_intermediates(x, indices=[12])


def test_round_trip_through_our_writer(tmp_path, vit_nps) -> None:
    """save_model writes the published format; .pt and .safetensors both load back to the same weights."""
    _, net, info = vit_nps
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(5))
    for suffix in (".pt", ".safetensors"):
        path = ornis.save_model(
            net, tmp_path / f"copy{suffix}", class_to_idx=info.class_to_idx, rgb_stats=info.rgb_stats
        )
        again, again_info = ornis.load_pretrained_model(path, inference=True)
        assert again.name == net.name and again_info.class_to_idx == info.class_to_idx
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), net.state_dict().values()))
        with torch.no_grad():  # same weights; kernels may block differently on differently aligned memory
            assert scale_err(again(x), net(x)) < 1e-6


@pytest.mark.slow
def test_real_vit_l14_reg4_config_at_518(tmp_path) -> None:
    """The published ViT-L/14 layout at its published size: 304.4 M parameters, 37x37 neck, parity."""
    path = tmp_path / "vit_reg4_l14_nps_ls_dino-v2-lvd142m.pt"
    ref = birder_checkpoint("vit_reg4_l14_nps_ls", path, 518, 0, std=0.02)
    net, info = ornis.load_pretrained_model(path, inference=True)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == 304.4
    x = torch.randn(1, 3, 518, 518, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        feats = net.forward_intermediates(x)
        tokens = ref.forward_features(x)  # [4 registers, class, 37*37 patches] after the final norm
    assert feats.maps["block23"].shape == feats.patch_tokens.shape == (1, 1024, 37, 37)
    assert scale_err(feats.embedding, tokens[:, 4]) < TOL
    assert scale_err(feats.patch_tokens.flatten(2).transpose(1, 2), tokens[:, 5:]) < TOL


def test_flexi_resize_under_export_does_not_poison_the_cache() -> None:
    """The pseudo-inverse matrix is cached; a first call while torch.export traces with fake tensors must not
    leave a fake tensor in the cache for later eager calls."""
    from ornis.models import layers

    class Patch12(torch.nn.Module):
        def __init__(self, net: torch.nn.Module) -> None:
            super().__init__()
            self.net = net

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net.embedding(x, patch_size=12)

    layers._PINV_CACHE.clear()
    torch.manual_seed(0)
    net = ornis.build_model("flexivit_t16", size=48).eval()
    x = torch.randn(1, 3, 48, 48)
    exported = torch.export.export(Patch12(net), (x,), strict=False)
    with torch.no_grad():
        eager = net.embedding(x, patch_size=12)
        layers._PINV_CACHE.clear()
        fresh = net.embedding(x, patch_size=12)
        assert torch.equal(eager, fresh)
        assert scale_err(exported.module()(x), fresh) < 1e-5
