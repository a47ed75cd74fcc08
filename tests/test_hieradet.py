"""HieraDet (SAM 2's trunk) and its dynamic-window-size variant against Birder 0.8.4, the reference.

Parity of the published architectures: the reference with random weights is saved in the published format
(``birder_checkpoint``), loaded with ``ornis.load_pretrained_model`` (strict), and fp32 outputs are compared relative
to the reference's scale, at 224 and at 192 (where hieradet_small's 14- and 7-wide windows need zero padding).
Size-independent behaviour is checked on tiny configs built in both libraries.
"""

from __future__ import annotations

import pytest
import torch
from conftest import birder_checkpoint, scale_err

import ornis
from ornis.models import onednn
from ornis.models.hieradet import HieraDet

TOL = 1e-5
CARD_SHAPES_224 = {"stage1": (96, 56, 56), "stage2": (192, 28, 28), "stage3": (384, 14, 14), "stage4": (768, 7, 7)}
TINY = {"depths": [1, 1, 2, 1], "embed_dim": 32, "num_heads": 1, "global_att_blocks": [3]}
PUBLISHED = ["hieradet_small", "hieradet_d_small"]


def reference_outputs(ref: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output from one reference pass: the last stage is the final feature map."""
    with torch.no_grad():
        out = dict(ref.detection_features(x))
        out["embedding"] = ref.embedding_from_features(out["stage4"].permute(0, 2, 3, 1))
        out["logits"] = ref.classify(out["embedding"])
    return out


def ornis_outputs(net: ornis.models.Encoder, x: torch.Tensor) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = dict(net.detection_features(x))
        out["embedding"] = net.embedding(x)
        out["logits"] = net.classify(out["embedding"])  # forward() is classify(embedding()) by construction
    return out


def assert_parity(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor]) -> dict[str, float]:
    assert ours.keys() == theirs.keys()
    errors = {k: scale_err(ours[k], theirs[k]) for k in theirs}
    print({k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < TOL, errors
    return errors


def tiny_pair(name: str, size: int, num_classes: int = 0, **config) -> tuple[torch.nn.Module, HieraDet]:
    """The reference and ours, same tiny config, same random weights (every tensor N(0, 0.05))."""
    from birder.model_registry import registry

    torch.manual_seed(0)
    ref = registry.net_factory(name, num_classes, 3, size=(size, size), config={**TINY, **config})
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    net = ornis.build_model(name, num_classes=num_classes, size=size, config={**TINY, **config})
    net.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), net.eval()


def reference_windows(ref: torch.nn.Module) -> list[int]:
    return [blk.window_size for stage in ref.body for blk in stage]


def our_windows(net: HieraDet) -> list[int]:
    return [blk.window_size for stage in net.body for blk in stage]


# -- the published architectures ----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PUBLISHED)
def test_parameter_count_matches_card_and_reference(name: str) -> None:
    from birder.model_registry import registry

    with torch.device("meta"):
        net = ornis.build_model(name, num_classes=0, size=224)
        ref = registry.net_factory(name, 0, 3, size=(224, 224))
    count = sum(p.numel() for p in net.parameters())
    # The card's 33.9 M: the encoder without a head (the position tables do not depend on the size)
    assert count == sum(p.numel() for p in ref.parameters()) == 33_948_864
    assert round(count / 1e6, 1) == 33.9
    assert net.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize(
    "name,size",
    [
        ("hieradet_small", 224),
        ("hieradet_small", 256),
        ("hieradet_small", 1024),
        ("hieradet_d_small", 224),
        ("hieradet_d_small", 256),
    ],
)
def test_detection_feature_shapes(name: str, size: int) -> None:
    with torch.device("meta"):
        net = ornis.build_model(name, size=224)
        features = net.detection_features(torch.empty(1, 3, size, size))
    shapes = {k: tuple(v.shape[1:]) for k, v in features.items()}
    side = size // 4
    assert shapes == {k: (c, side >> i, side >> i) for i, (k, (c, _, _)) in enumerate(CARD_SHAPES_224.items())}
    if size == 224:
        assert shapes == CARD_SHAPES_224
    assert net.return_channels == [96, 192, 384, 768] and net.embedding_size == 768


@pytest.mark.parametrize("name", PUBLISHED)
def test_window_sizes_follow_the_reference(name: str) -> None:
    from birder.model_registry import registry

    with torch.device("meta"):
        net = ornis.build_model(name, size=224)
        ref = registry.net_factory(name, 0, 3, size=(224, 224))
    # The stage's window also applies to the next stage's first (pooling) block; "d" attends globally (0) in 3-4
    expected = {
        "hieradet_small": [8, 8, 4, 4, 14, 14, 14, 0, 14, 14, 0, 14, 14, 0, 14, 7],
        "hieradet_d_small": [8, 8, 4, 4] + [0] * 12,
    }[name]
    assert our_windows(net) == reference_windows(ref) == expected
    net.adjust_size((1024, 1024))
    ref.adjust_size((1024, 1024))
    assert our_windows(net) == reference_windows(ref) == expected  # fixed windows: SAM 2 runs these at 1024


def test_registered_variants() -> None:
    names = set(ornis.list_models("hieradet_*"))
    for size in ("tiny", "small", "base", "base_plus", "large"):
        assert {f"hieradet_{size}", f"hieradet_d_{size}"} <= names


@pytest.fixture(scope="module", params=PUBLISHED)
def published(request, tmp_path_factory: pytest.TempPathFactory):
    name = request.param
    path = tmp_path_factory.mktemp(name) / f"{name}_random.pt"
    ref = birder_checkpoint(name, path, size=224, num_classes=10)
    net, _ = ornis.load_pretrained_model(path, inference=True)
    return name, ref, net, path


@pytest.mark.slow
def test_parity_224(published) -> None:
    name, ref, net, _ = published
    assert isinstance(net, HieraDet) and net.name == name and net.num_classes == 10
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    assert_parity(ornis_outputs(net, x), reference_outputs(ref, x))


@pytest.mark.slow
def test_parity_other_size_per_call_and_new_size(published) -> None:
    """192: per call on the 224 model (the reference runs any size too), and through ``new_size=``."""
    _, ref, net, path = published
    torch.manual_seed(1)
    x = torch.randn(1, 3, 192, 192)
    theirs = reference_outputs(ref, x)
    assert_parity(ornis_outputs(net, x), theirs)
    rebased, _ = ornis.load_pretrained_model(path, inference=True, new_size=192)
    assert rebased.size == (192, 192)
    with torch.no_grad():
        assert scale_err(rebased.detection_features(x)["stage4"], theirs["stage4"]) < TOL


# -- size-independent behaviour, on tiny configs ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hieradet_tiny", "hieradet_d_tiny"])
def test_masked_encoding_retention_matches_reference(name: str) -> None:
    ref, net = tiny_pair(name, 128)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128)
    mask = (torch.rand(2, 16) < 0.5).float()  # 1 = masked, one entry per 32x32 pixels
    token = torch.randn(32)
    with torch.no_grad():
        for mask_token in (None, token):
            ours = net.masked_encoding_retention(x, mask, mask_token=mask_token, return_keys="all")
            theirs = ref.masked_encoding_retention(x, mask, mask_token=mask_token, return_keys="all")
            assert ours["features"].shape == (2, 256, 4, 4)
            assert scale_err(ours["features"], theirs["features"]) < TOL
            assert scale_err(ours["embedding"], theirs["embedding"]) < TOL
        unmasked = net.masked_encoding_retention(x, torch.zeros(2, 16), return_keys="embedding")["embedding"]
        assert torch.allclose(unmasked, net.embedding(x), atol=1e-6)


def test_fractional_windows_follow_adjust_size() -> None:
    """A negative window_spec entry -d means min(size) // d, fixed at build / adjust_size (no registered variant)."""
    ref, net = tiny_pair("hieradet_tiny", 128, num_classes=4, window_spec=[8, 4, -16, -32])
    assert our_windows(net) == reference_windows(ref) == [8, 8, 4, 0, 8]  # block 3 is global
    ref.adjust_size((256, 256))
    net.adjust_size((256, 256))
    assert our_windows(net) == reference_windows(ref) == [8, 8, 4, 0, 16]
    torch.manual_seed(0)
    x = torch.randn(1, 3, 256, 256)
    assert_parity(ornis_outputs(net, x), reference_outputs(ref, x))


def test_padded_windows_non_square_match_reference() -> None:
    """Windows larger than / not dividing the map (zero padding) on a non-square input, per call."""
    ref, net = tiny_pair("hieradet_tiny", 128, num_classes=4, window_spec=[8, 4, 6, 3], global_pos_size=[5, 5])
    torch.manual_seed(0)
    x = torch.randn(1, 3, 160, 96)
    assert_parity(ornis_outputs(net, x), reference_outputs(ref, x))


def test_return_stages_and_forward_intermediates_agree() -> None:
    _, net = tiny_pair("hieradet_d_tiny", 128)
    torch.manual_seed(2)
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        full = net.detection_features(x)
        net.return_stages = ["stage1", "stage3"]
        only = net.detection_features(x)
        feats = net.forward_intermediates(x, indices=[1, -1], norm=True)
        embedding = net.embedding(x)
    assert list(only) == ["stage1", "stage3"] and all(torch.equal(only[k], full[k]) for k in only)
    assert list(feats.maps) == ["stage2", "stage4"] and torch.equal(feats.maps["stage2"], full["stage2"])
    expected = net.features[0](full["stage4"].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(feats.maps["stage4"], expected, atol=1e-6)
    assert torch.allclose(feats.patch_tokens, expected, atol=1e-6)
    assert torch.allclose(feats.embedding, embedding, atol=1e-6)
    assert feats.patch_tokens.shape == (1, 256, 4, 3)


@pytest.mark.slow
def test_traces_as_one_graph() -> None:
    """No graph breaks (data-dependent Python control flow) in the inference and masked paths."""
    import torch._dynamo

    _, net = tiny_pair("hieradet_tiny", 64)
    x = torch.randn(2, 3, 64, 64)
    mask = torch.tensor([[1.0, 0, 0, 1], [0, 0, 1, 0]])
    torch._dynamo.reset()
    with torch.no_grad(), onednn.enabled(False):  # compiled graphs run PyTorch's layers: compare like with like
        for fn, args in ((net.detection_features, (x,)), (net.masked_encoding_retention, (x, mask))):
            compiled = torch.compile(fn, backend="eager", fullgraph=True)(*args)
            eager = fn(*args)
            for a, b in zip(torch.utils._pytree.tree_leaves(compiled), torch.utils._pytree.tree_leaves(eager)):
                assert torch.equal(a, b)
