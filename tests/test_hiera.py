"""Hiera (absolute-window and plain position embedding) against Birder 0.8.4, the reference.

Parity of the published architecture: the reference with random weights is saved in the published format
(``birder_checkpoint``), the file is loaded with ``ornis.load_pretrained_model`` (strict), fp32 outputs are compared
relative to the reference's scale. Behaviour that does not depend on the model's size (masking, per-call sizes,
stage selection, checkpointing, tracing) is checked on a tiny config of the same family, built in both libraries.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import birder_checkpoint, scale_err

import ornis
from ornis.models import onednn
from ornis.models.hiera import Hiera

TOL = 1e-5
CARD_SHAPES_224 = {"stage1": (96, 56, 56), "stage2": (192, 28, 28), "stage3": (384, 14, 14), "stage4": (768, 7, 7)}
TINY = {"depths": [1, 1, 2, 1], "embed_dim": 32, "num_heads": 1}


def reference_outputs(ref: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every output from one reference pass: the last stage *is* the final token sequence (row-major)."""
    with torch.no_grad():
        out = dict(ref.detection_features(x))
        tokens = out["stage4"].flatten(2).transpose(1, 2)
        out["embedding"] = ref.embedding_from_features(tokens)
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


def tiny_pair(name: str, size: int | tuple[int, int], num_classes: int = 0, **config) -> tuple[torch.nn.Module, Hiera]:
    """The reference and ours, same tiny config, same random weights (every tensor N(0, 0.05))."""
    from birder.model_registry import registry

    hw = (size, size) if isinstance(size, int) else size
    torch.manual_seed(0)
    ref = registry.net_factory(name, num_classes, 3, size=hw, config={**TINY, **config})
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0.0, 0.05)
    net = ornis.build_model(name, num_classes=num_classes, size=hw, config={**TINY, **config})
    net.load_state_dict(ref.state_dict(), strict=True)
    return ref.eval(), net.eval()


# -- the published architecture ---------------------------------------------------------------------------------
def test_parameter_count_matches_card_and_reference() -> None:
    from birder.model_registry import registry

    with torch.device("meta"):
        net = ornis.build_model("hiera_abswin_base", num_classes=0, size=224)
        ref = registry.net_factory("hiera_abswin_base", 0, 3, size=(224, 224))
    count = sum(p.numel() for p in net.parameters())
    # The card's 50.5 M is the encoder without a head at 224 (its pos_embed is 14x14)
    assert count == sum(p.numel() for p in ref.parameters()) == 50_479_872
    assert round(count / 1e6, 1) == 50.5
    assert net.state_dict().keys() == ref.state_dict().keys()


@pytest.mark.parametrize("size", [224, 256, 320])
def test_detection_feature_shapes(size: int) -> None:
    with torch.device("meta"):
        net = ornis.build_model("hiera_abswin_base", size=224)
        features = net.detection_features(torch.empty(1, 3, size, size))
    shapes = {k: tuple(v.shape[1:]) for k, v in features.items()}
    side = size // 4
    assert shapes == {k: (c, side >> i, side >> i) for i, (k, (c, _, _)) in enumerate(CARD_SHAPES_224.items())}
    assert net.return_channels == [96, 192, 384, 768] and net.embedding_size == 768
    if size == 224:
        assert shapes == CARD_SHAPES_224


def test_registered_variants() -> None:
    names = set(ornis.list_models("hiera_*"))
    for size in ("tiny", "small", "base", "base_plus", "large", "huge"):
        assert {f"hiera_{size}", f"hiera_abswin_{size}"} <= names


def test_input_size_must_be_a_multiple_of_32() -> None:
    with torch.device("meta"):
        net = ornis.build_model("hiera_abswin_tiny", size=64)
        with pytest.raises(ValueError, match="64x80 is not a positive multiple of 32"):
            net.detection_features(torch.zeros(1, 3, 64, 80))
        with pytest.raises(ValueError, match="multiple of 32"):
            ornis.build_model("hiera_abswin_tiny", size=100)


@pytest.fixture(scope="module")
def base_checkpoint(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("hiera") / "hiera_abswin_base_random.pt"
    ref = birder_checkpoint("hiera_abswin_base", path, size=224, num_classes=10)
    return ref, path


@pytest.mark.slow
def test_parity_224(base_checkpoint) -> None:
    ref, path = base_checkpoint
    net, _ = ornis.load_pretrained_model(path, inference=True)
    assert isinstance(net, Hiera) and net.name == "hiera_abswin_base" and net.num_classes == 10
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)
    assert_parity(ornis_outputs(net, x), reference_outputs(ref, x))


@pytest.mark.slow
def test_parity_new_size_matches_reference_adjust_size(base_checkpoint) -> None:
    ref, path = base_checkpoint
    ref = copy.deepcopy(ref)
    ref.adjust_size((192, 192))
    net, _ = ornis.load_pretrained_model(path, inference=True, new_size=192)
    assert tuple(net.pos_embed.shape) == tuple(ref.pos_embed.shape) == (1, 96, 12, 12)
    torch.manual_seed(1)
    x = torch.randn(1, 3, 192, 192)
    assert_parity(ornis_outputs(net, x), reference_outputs(ref, x))


# -- size-independent behaviour, on tiny configs ------------------------------------------------------------------
@pytest.mark.parametrize("name", ["hiera_tiny", "hiera_abswin_tiny"])
def test_adjust_size_non_square_matches_reference(name: str) -> None:
    """Both position-embedding kinds, re-based from 64 to 96x64."""
    ref, net = tiny_pair(name, 64, num_classes=5)
    ref.adjust_size((96, 64))
    net.adjust_size((96, 64))
    assert net.pos_embed.shape == ref.pos_embed.shape
    torch.manual_seed(0)
    x = torch.randn(2, 3, 96, 64)
    assert_parity(ornis_outputs(net, x), reference_outputs(ref, x))


def test_per_call_size_interpolates_the_stored_table() -> None:
    """The reference has no per-call size for Hiera; ours interpolates the stored background table straight to the
    token grid, which is what a reference built at the new size computes when it carries that table."""
    ref, net = tiny_pair("hiera_abswin_tiny", 64, num_classes=5)
    ref_160, _ = tiny_pair("hiera_abswin_tiny", (160, 96), num_classes=5)
    state = ref.state_dict()
    ref_160.pos_embed = torch.nn.Parameter(state["pos_embed"].clone())  # 4x4 table, for a 40x24 token grid
    ref_160.load_state_dict(state)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 160, 96)
    assert_parity(ornis_outputs(net, x), reference_outputs(ref_160, x))


def test_masked_encoding_omission_matches_reference() -> None:
    ref, net = tiny_pair("hiera_abswin_tiny", 128)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 128, 128)
    # 16 mask units per image; keep 6, listed in a random order (both keep them in increasing order)
    ids_keep = torch.stack([torch.randperm(16)[:6] for _ in range(2)])
    with torch.no_grad():
        ours = net.masked_encoding_omission(x, ids_keep, return_keys="all")
        theirs = ref.masked_encoding_omission(x, ids_keep, return_keys="all")
        assert ours["tokens"].shape == (2, 6, 256)
        assert scale_err(ours["tokens"], theirs["tokens"]) < TOL
        assert scale_err(ours["embedding"], theirs["embedding"]) < TOL
        # Keeping every unit is the plain forward
        everything = net.masked_encoding_omission(x, torch.arange(16).expand(2, 16))["tokens"]
        assert torch.allclose(everything, net.forward_features(x), atol=1e-6)


def test_masked_encoding_for_mae_matches_reference() -> None:
    ref, net = tiny_pair("hiera_abswin_tiny", 128)
    torch.manual_seed(1)
    x = torch.randn(2, 3, 128, 128)
    mask = torch.ones(2, 16)  # 1 = masked
    for row in mask:
        row[torch.randperm(16)[:5]] = 0
    with torch.no_grad():
        ours, ours_keep = net.masked_encoding(x, mask)
        theirs, their_keep = ref.masked_encoding(x, mask)
    assert torch.equal(ours_keep, their_keep)
    assert [tuple(t.shape) for t in ours] == [(2, 5, 8, 8, 32), (2, 5, 4, 4, 64), (2, 5, 2, 2, 128), (2, 5, 1, 1, 256)]
    for a, b in zip(ours, theirs):
        assert scale_err(a, b) < TOL


def test_return_stages_and_forward_intermediates_agree() -> None:
    _, net = tiny_pair("hiera_abswin_tiny", 128)
    torch.manual_seed(2)
    x = torch.randn(1, 3, 128, 96)
    with torch.no_grad():
        full = net.detection_features(x)
        net.return_stages = ["stage2"]
        only = net.detection_features(x)
        feats = net.forward_intermediates(x, indices=[0, -1], norm=True)
        last_two = net.forward_intermediates(x, indices=2)
        embedding = net.embedding(x)
    assert list(only) == ["stage2"] and torch.equal(only["stage2"], full["stage2"])
    assert list(feats.maps) == ["stage1", "stage4"] and list(last_two.maps) == ["stage3", "stage4"]
    assert torch.equal(feats.maps["stage1"], full["stage1"]) and torch.equal(last_two.maps["stage4"], full["stage4"])
    expected = net.features[1](full["stage4"].permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(feats.maps["stage4"], expected, atol=1e-6)
    assert torch.allclose(feats.patch_tokens, expected, atol=1e-6)
    assert torch.allclose(feats.embedding, embedding, atol=1e-6)
    assert feats.patch_tokens.shape == (1, 256, 4, 3)


@pytest.mark.slow
def test_traces_as_one_graph() -> None:
    """No graph breaks (data-dependent Python control flow) in the inference and masked paths."""
    import torch._dynamo

    _, net = tiny_pair("hiera_abswin_tiny", 64)
    x = torch.randn(2, 3, 64, 64)
    ids_keep = torch.tensor([[0, 3], [2, 1]])
    torch._dynamo.reset()
    with torch.no_grad(), onednn.enabled(False):  # compiled graphs run PyTorch's layers: compare like with like
        for fn, args in ((net.detection_features, (x,)), (net.masked_encoding_omission, (x, ids_keep))):
            compiled = torch.compile(fn, backend="eager", fullgraph=True)(*args)
            eager = fn(*args)
            for a, b in zip(torch.utils._pytree.tree_leaves(compiled), torch.utils._pytree.tree_leaves(eager)):
                assert torch.equal(a, b)
