"""The inference fast path (``ornis.models.precision``): bf16 autocast and int8 dynamic quantisation against fp32
on real photos, with the accuracy bounds ``PRECISION_ACCURACY`` states (embedding cosine >= 0.9999 for bf16, >= 0.995
for int8, the shipped classifier's top-1 unchanged)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

import ornis
from ornis.assets import SAMPLES_DIR
from ornis.models.precision import PRECISION_ACCURACY, PRECISIONS, InferenceModel, prepare_for_inference

pytestmark = pytest.mark.usefixtures("one_thread")

RGB_STATS = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
# Random weights without layer scale (whose 1e-5 init would make every block a no-op and the check trivial)
RANDOM = {"hieradet_tiny": 224, "vit_reg1_t16": 224, "hiera_abswin_tiny": 224}


def batch_of(paths: list[Path], size: int, rgb_stats: dict = RGB_STATS) -> torch.Tensor:
    transform = ornis.classification_transform((size, size), rgb_stats)
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


def min_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a, b, dim=1).min().item()


def test_unknown_precision_is_a_value_error_naming_the_choices() -> None:
    net = ornis.build_model("vit_reg1_t16", size=32)
    with pytest.raises(ValueError, match=r"precision must be one of fp32, bf16, int8, got 'fp16'"):
        prepare_for_inference(net, "fp16")


def test_fp32_eager_is_the_model_itself_and_every_mode_is_documented() -> None:
    net = ornis.build_model("vit_reg1_t16", size=32).train()
    assert prepare_for_inference(net) is net and not net.training
    assert set(PRECISION_ACCURACY) == set(PRECISIONS) == {"fp32", "bf16", "int8"}


@pytest.mark.parametrize("name", list(RANDOM))
def test_bf16_and_int8_stay_close_to_fp32_on_real_photos(name: str, photos: list[Path]) -> None:
    torch.manual_seed(0)
    net = ornis.build_model(name, num_classes=7, size=RANDOM[name]).eval()
    x = batch_of(photos, RANDOM[name])
    with torch.inference_mode():
        ref = net.embedding(x)
        bf16 = prepare_for_inference(net, "bf16")
        int8 = prepare_for_inference(net, "int8")
        out_bf16, out_int8 = bf16.embedding(x), int8.embedding(x)
        feats = bf16.forward_intermediates(x, indices=1)
        logits = int8(x)
    assert out_bf16.dtype == out_int8.dtype == torch.float32
    assert min_cosine(out_bf16, ref) >= 0.9999
    assert min_cosine(out_int8, ref) >= 0.995
    assert 0.0 < (out_bf16 - ref).abs().max() and 0.0 < (out_int8 - ref).abs().max()  # really another precision
    assert all(t.dtype == torch.float32 for t in (feats.embedding, feats.patch_tokens, *feats.maps.values()))
    assert logits.shape == (len(photos), 7)
    # The caller's model is untouched: still fp32 nn.Linear layers
    assert all(
        type(m) is nn.Linear and m.weight.dtype == torch.float32 for m in net.modules() if isinstance(m, nn.Linear)
    )


def test_int8_quantises_every_linear_but_the_head_and_bf16_casts_matmul_weights() -> None:
    net = ornis.build_model("vit_reg1_t16", num_classes=3, size=32)
    int8 = prepare_for_inference(net, "int8")
    assert isinstance(int8, InferenceModel) and int8.precision == "int8"
    linears = [n for n, m in int8.net.named_modules() if type(m) is nn.Linear]
    quantised = [n for n, m in int8.net.named_modules() if type(m) is torch.ao.nn.quantized.dynamic.Linear]
    assert linears == ["classifier"]
    assert len(quantised) == 12 * 4  # qkv, proj, mlp.0, mlp.3 per block
    bf16 = prepare_for_inference(net, "bf16")
    assert bf16.net.encoder.block[0].attn.qkv.weight.dtype == torch.bfloat16
    assert bf16.net.conv_proj.weight.dtype == torch.bfloat16
    assert bf16.net.norm.weight.dtype == torch.float32  # norms stay fp32
    # The encoder's attributes pass through, and the wrapper copies like any module
    assert (int8.size, int8.embedding_size, int8.name) == (net.size, net.embedding_size, net.name)
    with pytest.raises(AttributeError, match="no_such_attribute"):
        _ = int8.no_such_attribute
    twin = copy.deepcopy(bf16)
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        assert torch.equal(twin.embedding(x), bf16.embedding(x))


def test_int8_refuses_a_model_off_the_cpu() -> None:
    with torch.device("meta"):
        net = ornis.build_model("vit_reg1_t16", size=32)
    with pytest.raises(ValueError, match=r"precision 'int8' runs on the CPU only; the model is on meta"):
        prepare_for_inference(net, "int8")


def test_shipped_classifier_keeps_its_top1_in_every_mode(photos: list[Path]) -> None:
    net, info = ornis.load_pretrained_model("ornis_shapes_vit_tiny", inference=True)
    size = ornis.get_size_from_signature(info.signature)[0]
    x = torch.cat([batch_of(sorted(SAMPLES_DIR.glob("*.jpg")), size, info.rgb_stats), batch_of(photos, size)])
    with torch.inference_mode():
        ref_emb = net.embedding(x)
        ref = net(x).argmax(1)
        for precision in ("bf16", "int8"):
            fast = prepare_for_inference(net, precision)
            emb = fast.embedding(x)
            assert torch.equal(fast.classify(emb).argmax(1), ref), precision
            assert torch.equal(fast(x).argmax(1), ref), precision
            assert min_cosine(emb, ref_emb) >= (0.9999 if precision == "bf16" else 0.995), precision


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "int8"])
def test_compiled_fast_path_matches_eager(precision: str) -> None:
    torch.manual_seed(0)
    net = ornis.build_model("vit_reg1_t16", num_classes=3, size=32, config={"num_layers": 1}).eval()
    fast = prepare_for_inference(net, precision)
    compiled = prepare_for_inference(net, precision, compile=True)
    torch._dynamo.reset()
    with torch.inference_mode():
        for batch in (1, 3):
            x = torch.randn(batch, 3, 32, 32)
            torch.testing.assert_close(compiled.embedding(x), fast.embedding(x), rtol=2e-2, atol=2e-2)
