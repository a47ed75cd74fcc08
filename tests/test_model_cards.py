"""Every Python snippet of the five model cards runs with ``birder`` replaced by ``ornis``.

The snippets are read from the cards themselves (copied into tests/data/model-cards/), the published name is
served from a temporary cache holding a random-weight checkpoint in the published format, and the shapes the
cards state in their comments ("shape of (1, 550)", "Output example: [...]") are asserted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
from pathlib import Path

import pytest
import torch

import ornis
from ornis.weights import manifest
from ornis.weights.checkpoint import sha256_file

CARDS = sorted((Path(__file__).parent / "data" / "model-cards").glob("*.md"))
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


def serve_from_cache(name: str, size: int, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A random-weight checkpoint under the published file name, with the manifest pointed at its checksum."""
    weights = manifest.get_weights(name)
    torch.manual_seed(0)
    net = ornis.build_model(weights.network, num_classes=weights.num_classes, size=size)
    path = ornis.save_model(net, cache / "weights" / f"{name}.pt")
    test_file = dataclasses.replace(weights.file("pt"), sha256=sha256_file(path))
    monkeypatch.setitem(manifest.MANIFEST, name, dataclasses.replace(weights, files=(test_file,)))
    monkeypatch.setenv("ORNIS_CACHE", str(cache))
    monkeypatch.setenv("ORNIS_OFFLINE", "1")


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
    serve_from_cache(card.stem, card_input_size(card), tmp_path / "cache", monkeypatch)
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
