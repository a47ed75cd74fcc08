"""``ornis models list / info / download / verify``, through the CLI's ``main``."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from support.hub import resolve_path, running_hub, weights_entry

import ornis
from ornis.cli.main import main
from ornis.weights import manifest

NAME = "vit_t16_cli-test"
NETWORK = "vit_t16"
SMALL = {"num_layers": 1}


@pytest.fixture(scope="module")
def checkpoint_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "w.pt"
    ornis.save_model(ornis.build_model(NETWORK, size=32, config=SMALL), path, config=SMALL)
    return path.read_bytes()


@pytest.fixture()
def published_only(monkeypatch):
    """Hide weights that ship inside the package (present or not, depending on the build) from verify's count."""
    for name, w in list(manifest.MANIFEST.items()):
        if w.extra.get("local_path"):
            monkeypatch.delitem(manifest.MANIFEST, name)


@pytest.fixture()
def served(checkpoint_bytes, monkeypatch, tmp_path, published_only):
    """A manifest entry served from a loopback server; an empty cache under tmp_path."""
    # The entry's own hub is never reached: the tests pass --base-url
    weights = weights_entry(NAME, NETWORK, checkpoint_bytes, num_classes=0, endpoint="http://127.0.0.1:9")
    monkeypatch.setitem(manifest.MANIFEST, NAME, weights)
    monkeypatch.setenv("ORNIS_OFFLINE", "0")
    monkeypatch.delenv("ORNIS_BASE_URL", raising=False)
    with running_hub() as srv:
        srv.publish(f"birder-project/{NAME}", f"{NAME}.pt", checkpoint_bytes)
        yield srv, weights, tmp_path / "cache"


def test_list_published_weights(capsys, tmp_path):
    assert main(["models", "list", "--cache", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["name", "architecture", "resolution", "format", "size", "(MB)", "cached"]
    rows = [line.split() for line in lines[1:]]
    by_name = {(r[0], r[3]): r for r in rows}
    published = {n for n in manifest.MANIFEST if not manifest.MANIFEST[n].extra.get("local_path")}
    assert len(published) == 5 and {n for n, _ in by_name} >= published
    assert len(rows) == len(by_name) == len(manifest.MANIFEST) + 1  # hiera_abswin_base_mim in two formats
    assert by_name[("vit_reg4_l14_nps_ls_dino-v2-lvd142m", "pt")][1:] == [
        "vit_reg4_l14_nps_ls",
        "518",
        "pt",
        "1161.2",
        "no",
    ]
    assert by_name[("hiera_abswin_base_mim", "safetensors")][4] == "192.6"


def test_list_architectures_with_pattern(capsys):
    assert main(["models", "list", "--architectures", "hieradet_*"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    assert {r[0] for r in rows} == set(ornis.list_models("hieradet_*"))
    assert all(r[1] == "hieradet" for r in rows)
    assert main(["models", "list", "no-such-*"]) == 1


def test_info_published_and_architecture(capsys):
    assert main(["models", "info", "hieradet_small_sam2_1"]) == 0
    out = capsys.readouterr().out
    assert "2ede3a78389ca74ed37d82dbc1c3410549f1fdafb5a7a94ac02968aa6d3dec80" in out
    assert "https://huggingface.co/birder-project/hieradet_small_sam2_1/resolve/main/hieradet_small_sam2_1.pt" in out
    assert "parameters (M)  33.9" in out and "1024x1024" in out
    assert main(["models", "info", "vit_reg4_l14_nps_ls"]) == 0
    out = capsys.readouterr().out
    assert "vit_reg4_l14_nps_ls_dino-v2-lvd142m" in out and "config.pos_embed_special_tokens  False" in out
    assert main(["models", "info", "hieradet_smal"]) == 1
    assert "did you mean" in capsys.readouterr().err


def test_info_checkpoint_file(capsys, checkpoint_bytes, tmp_path):
    """A path is described like load_pretrained_model reads it: the architecture, size, overrides and checksum."""
    path = tmp_path / "mine.pt"
    path.write_bytes(checkpoint_bytes)
    assert main(["models", "info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "architecture      vit_t16" in out and "32x32" in out and "{'num_layers': 1}" in out
    assert hashlib.sha256(checkpoint_bytes).hexdigest() in out and "not a published file" in out


def test_info_suggests_among_weights_and_architectures(capsys):
    """One resolver for every entry point: a near-miss of a published name is suggested, not only architectures."""
    assert main(["models", "info", "hieradet_small_sam2"]) == 1
    assert "did you mean 'hieradet_small_sam2_1'" in capsys.readouterr().err


def test_download_list_and_verify(served, capsys):
    srv, weights, cache_root = served
    args = ["--cache", str(cache_root)]
    assert main(["models", "download", NAME, "--base-url", f"{srv.url}/m", "--no-progress", *args]) == 0
    assert "sha256 verified" in capsys.readouterr().out
    assert srv.gets() == [(resolve_path(NAME, prefix="/m"), None)]
    path = cache_root / "weights" / f"{NAME}.pt"
    assert hashlib.sha256(path.read_bytes()).hexdigest() == weights.files[0].sha256

    assert main(["models", "list", NAME, *args]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[-1] == "yes"

    assert main(["models", "verify", *args]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "1 ok, 0 bad"

    data = path.read_bytes()
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # damage the cached file
    assert main(["models", "verify", NAME, *args]) == 1
    out = capsys.readouterr().out
    assert "BAD" in out and weights.files[0].sha256 in out and out.splitlines()[-1] == "0 ok, 1 bad"

    # --force drops the damaged copy and fetches the published bytes again
    assert main(["models", "download", NAME, "--base-url", f"{srv.url}/m", "--no-progress", "--force", *args]) == 0
    assert main(["models", "verify", *args]) == 0
    assert len(srv.gets()) == 2


def test_download_unknown_name_fails_before_fetching(served, capsys):
    srv, _, cache_root = served
    assert main(["models", "download", NAME, "not-a-model", "--cache", str(cache_root), "--base-url", srv.url]) == 1
    assert "unknown pretrained model 'not-a-model'" in capsys.readouterr().err
    assert srv.requests == []


def test_download_offline_explains(served, capsys, monkeypatch):
    _, weights, cache_root = served
    monkeypatch.setenv("ORNIS_OFFLINE", "1")
    assert main(["models", "download", NAME, "--cache", str(cache_root)]) == 1
    err = capsys.readouterr().err
    assert "offline" in err and str(cache_root / "weights" / f"{NAME}.pt") in err and weights.url() in err


def test_verify_empty_cache(capsys, tmp_path: Path, published_only):
    assert main(["models", "verify", "--cache", str(tmp_path)]) == 0
    assert "no published weights in the cache" in capsys.readouterr().out


def test_info_shipped_model_counts_its_own_architecture(capsys):
    """The shipped model is a 4-block vit_t16 at 48 px: its file's config overrides count (0.82 M, not the full
    vit_t16's 5.5 M), and it has no URL: it ships with ornis."""
    from ornis.assets import DEMO_MODEL, DEMO_MODEL_FILE

    net, _ = ornis.load_pretrained_model(DEMO_MODEL_FILE)
    assert sum(p.numel() for p in net.parameters()) == pytest.approx(0.82e6, abs=0.005e6)
    assert main(["models", "info", DEMO_MODEL]) == 0
    out = capsys.readouterr().out
    assert "parameters (M)  0.82" in out
    assert "pt url          none: ships with ornis" in out
    assert "huggingface" not in out and f"{DEMO_MODEL_FILE} (ships with ornis)" in out


def test_download_malformed_base_url_fails_at_once(served, capsys, monkeypatch):
    _, _, cache_root = served
    args = ["models", "download", NAME, "--cache", str(cache_root), "--no-progress", "--base-url", "localhost:8000"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ornis: error: 'localhost:8000/")
    assert "is not a valid download URL (the scheme is 'localhost'" in err
    assert not (cache_root / "weights").exists()


def test_download_into_a_cache_that_is_a_file(served, capsys, monkeypatch, tmp_path):
    srv, _, _ = served
    blocker = tmp_path / "cache.txt"
    blocker.write_text("not a folder")
    monkeypatch.setenv("ORNIS_CACHE", str(blocker))
    assert main(["models", "download", NAME, "--base-url", f"{srv.url}/m", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert f"ornis: error: ORNIS_CACHE={blocker}: the weights cache cannot be used: {blocker} is a file" in err
    assert srv.requests == []
    assert main(["models", "download", NAME, "--base-url", f"{srv.url}/m", "--no-progress", "--force"]) == 1
    assert f"{blocker} is a file, not a folder" in capsys.readouterr().err
