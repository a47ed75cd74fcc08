"""Every Python snippet of the five model cards runs with ``birder`` replaced by ``ornis``, and gives the
reference's numbers.

The snippets are read from the cards themselves (copied into tests/data/model-cards/). The published name is
served from a temporary cache holding the *reference's* random-weight checkpoint under the published file name
(the manifest entry's checksum pointed at that file), so ``ornis.load_pretrained_model("<name>")`` finds it
offline. The shapes the cards state in their comments ("shape of (1, 550)", "Output example: [...]") are asserted,
and the snippet's outputs are compared with the reference model's on the same photo (1e-5 of scale).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest
import torch
from conftest import birder_checkpoint, scale_err

import ornis
from ornis.inference.classification import open_rgb
from ornis.weights import manifest
from ornis.weights.checkpoint import sha256_file

CARDS = sorted((Path(__file__).parent / "data" / "model-cards").glob("*.md"))
TOL = 1e-5
SLOW_CARDS = {"vit_reg4_l14_nps_ls_dino-v2-lvd142m"}  # ViT-L/14 at 518 px: ~1 TFLOP a forward on 2 cores


def card_snippets(card: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card.read_text(), flags=re.S)


def card_input_size(card: Path) -> int:
    return int(re.search(r"Input image size: (\d+) x \d+", card.read_text()).group(1))


def expected_shapes(snippet: str) -> dict[str, tuple[int, ...]]:
    return {
        var: tuple(int(d) for d in dims.split(","))
        for var, dims in re.findall(r"# (\w+) is a NumPy array with shape of \(([\d, ]+)\)", snippet)
    }


def expected_printout(snippet: str) -> str | None:
    if "# Output example:" not in snippet:
        return None
    tail = snippet.split("# Output example:", 1)[1]
    return "".join(line.strip().lstrip("#").strip() for line in tail.splitlines() if line.strip().startswith("#"))


def serve_reference(name: str, size: int, cache: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    """The reference's random-weight checkpoint under the published file name, with the manifest pointed at its
    checksum. (hieradet_small_sam2_1: the card states 224; the manifest's 1024 is SAM 2's own resolution.)"""
    weights = manifest.get_weights(name)
    path = cache / "weights" / f"{name}.pt"
    path.parent.mkdir(parents=True)
    ref = birder_checkpoint(weights.network, path, size, weights.num_classes, std=0.02)
    test_file = dataclasses.replace(weights.file("pt"), sha256=sha256_file(path))
    monkeypatch.setitem(manifest.MANIFEST, name, dataclasses.replace(weights, files=(test_file,)))
    monkeypatch.setenv("ORNIS_CACHE", str(cache))
    monkeypatch.setenv("ORNIS_OFFLINE", "1")
    return ref


CASES = [
    pytest.param(card, i, id=f"{card.stem}-{i}", marks=[pytest.mark.slow] if card.stem in SLOW_CARDS else [])
    for card in CARDS
    for i in range(len(card_snippets(card)))
]


def test_all_five_cards_are_here() -> None:
    five = {
        "hieradet_d_small_dino-v2",
        "hieradet_small_sam2_1",
        "hiera_abswin_base_mim",
        "vit_reg4_l14_nps_ls_dino-v2-lvd142m",
        "flexivit_reg1_s16_rms_ls_dino-v2-il-all",
    }
    assert {c.stem for c in CARDS} == five and five <= set(ornis.list_pretrained_models())
    assert sum(len(card_snippets(c)) for c in CARDS) == 11


@pytest.mark.parametrize("card,index", CASES)
def test_card_snippet_runs_with_ornis(card: Path, index: int, tmp_path, monkeypatch, photos) -> None:
    snippet = card_snippets(card)[index]
    ref = serve_reference(card.stem, card_input_size(card), tmp_path / "cache", monkeypatch)
    code = snippet.replace("birder", "ornis").replace('"path/to/image.jpeg"', repr(str(photos[0])))
    namespace: dict = {}
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, f"{card.name}[{index}]", "exec"), namespace)

    shapes = expected_shapes(snippet)
    for var, shape in shapes.items():
        assert namespace[var].shape == shape, f"{var}: card says {shape}"
        assert namespace[var].dtype == "float32"
    expected = expected_printout(snippet)
    if expected is not None:
        assert printed.getvalue().replace("\n", "").replace(" ", "") == expected.replace(" ", "")
    assert shapes or expected is not None, "a snippet with nothing to check"

    # The same numbers as the reference on the same photo
    x = namespace["transform"](open_rgb(photos[0])).unsqueeze(0)
    kwargs = {"patch_size": 24} if "patch_size=24" in snippet else {}
    with torch.no_grad():
        if "embedding" in shapes:
            assert scale_err(torch.from_numpy(namespace["embedding"]), ref.embedding(x)) < TOL
        if "out" in shapes:
            assert scale_err(torch.from_numpy(namespace["out"]), torch.softmax(ref(x, **kwargs), dim=1)) < TOL
        if "features" in namespace:
            theirs = ref.detection_features(x)  # the reference 0.8.4 names a plain ViT's map "stage1", the cards "neck"
            assert len(namespace["features"]) == len(theirs)
            for ours, expected_map in zip(namespace["features"].values(), theirs.values()):
                assert scale_err(ours, expected_map) < TOL
