"""Export to TorchScript / torch.export / ONNX: every format reloads and matches the eager model (fp32, 1e-4 relative
to the output scale) at batch sizes 1 and 3 through one file; bad requests fail loudly and leave no file behind.

Models are the families' smallest variants cut to one or two blocks per stage, with random N(0, 0.05) weights (so
no zero-initialised head or token hides a difference), at 64x64 inputs.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
from conftest import scale_err

import ornis
from ornis.errors import CheckpointFormatError, ExportCheckError, ExportError
from ornis.export import ExportedModel, check, export_model, load_exported, read_export_metadata

HAVE_ONNX = all(importlib.util.find_spec(m) is not None for m in ("onnx", "onnxscript", "onnxruntime"))
needs_onnx = pytest.mark.skipif(
    not HAVE_ONNX, reason="ONNX export needs onnx, onnxscript and onnxruntime (the test extra)"
)

TOL = 1e-4
SIZE = 64
CLASSES = {f"bird_{i}": i for i in range(5)}

# family -> (architecture, config overrides that keep it small)
FAMILIES = {
    "vit": ("vit_reg4_t16", {"num_layers": 2}),
    "flexivit": ("flexivit_reg1_t16_rms_ls", {"num_layers": 2}),
    "hiera": ("hiera_abswin_tiny", {"depths": (1, 1, 1, 1)}),
    "hieradet": ("hieradet_tiny", {"depths": (1, 1, 2, 1), "global_att_blocks": (3,)}),
}

# Each (family, format) exports a different output, so all three outputs go through every format and family kind
CASES = [
    ("vit", "pts", "logits"),
    ("vit", "pt2", "embedding"),
    ("vit", "onnx", "features"),
    ("flexivit", "pts", "embedding"),
    ("flexivit", "pt2", "features"),
    ("flexivit", "onnx", "logits"),
    ("hiera", "pts", "features"),
    ("hiera", "pt2", "logits"),
    ("hiera", "onnx", "embedding"),
    ("hieradet", "pts", "embedding"),
    ("hieradet", "pt2", "features"),
    ("hieradet", "onnx", "logits"),
]


def small_model(family: str) -> ornis.Encoder:
    name, config = FAMILIES[family]
    torch.manual_seed(0)
    net = ornis.build_model(name, num_classes=len(CLASSES), size=SIZE, config=config)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    return net.eval()


def eager_outputs(
    net: ornis.Encoder, output: str, x: torch.Tensor, patch_size: int | None = None
) -> list[torch.Tensor]:
    kw = {"patch_size": patch_size} if patch_size else {}
    with torch.no_grad():
        if output == "embedding":
            return [net.embedding(x, **kw)]
        if output == "logits":
            return [net(x, **kw)]
        return list(net.detection_features(x, **kw).values())


def run_exported(path: Path, fmt: str, x: torch.Tensor) -> list[torch.Tensor]:
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return [torch.from_numpy(a) for a in session.run(None, {"x": x.numpy()})]
    module, _ = ornis.load_pretrained_model(path, file_format=fmt, inference=True)
    with torch.no_grad():
        out = module(x)
    return list(out.values()) if isinstance(out, dict) else [out]


def assert_matches(
    path: Path, fmt: str, net: ornis.Encoder, output: str, x: torch.Tensor, patch_size: int | None = None
) -> float:
    want = eager_outputs(net, output, x, patch_size)
    got = run_exported(path, fmt, x)
    assert len(got) == len(want)
    worst = max(scale_err(g, w) for g, w in zip(got, want))
    assert worst < TOL, f"{path.name} at input {tuple(x.shape)}: {worst:.3g}"
    return worst


def leftovers(folder: Path) -> list[str]:
    return sorted(os.listdir(folder)) if folder.exists() else []


# The hierarchical families take 15-40 s per export on 2 CPU cores (mostly the exporters' own graph passes)
SLOW_FAMILIES = {"hiera", "hieradet"}


@pytest.mark.parametrize(
    "family,fmt,output",
    [
        pytest.param(
            *c, id="-".join(c), marks=[pytest.mark.slow] * (c[0] in SLOW_FAMILIES) + [needs_onnx] * (c[1] == "onnx")
        )
        for c in CASES
    ],
)
def test_export_reloads_and_matches_eager(tmp_path: Path, family: str, fmt: str, output: str) -> None:
    net = small_model(family)
    path = tmp_path / f"{family}.{fmt}"
    report = export_model(net, path, output=output, class_to_idx=CLASSES)
    assert report.max_rel_diff < TOL and report.format == fmt and report.path == path
    assert leftovers(tmp_path) == [path.name]  # no temporary file left beside it

    # Batch sizes 1 and 3 through the same file (it was traced at batch 2)
    for batch in (1, 3):
        x = torch.randn(batch, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(batch))
        assert_matches(path, fmt, net, output, x)

    meta = read_export_metadata(path)
    assert meta["class_to_idx"] == CLASSES
    assert meta["network"] == FAMILIES[family][0]
    assert meta["export"]["output"] == output
    assert meta["export"]["output_names"] == (list(net.return_stages) if output == "features" else [output])
    assert ornis.get_size_from_signature(meta["signature"]) == (SIZE, SIZE)
    if fmt != "onnx":
        module, info = ornis.load_pretrained_model(path, file_format=fmt)
        assert info.class_to_idx == CLASSES and info.network == FAMILIES[family][0] and module.size == (SIZE, SIZE)


def test_torchscript_keeps_the_card_api(tmp_path: Path) -> None:
    """A .pts file keeps embedding / classify / detection_features, so infer_image's path runs on it unchanged."""
    net = small_model("vit")
    path = tmp_path / "vit.pts"
    export_model(net, path, output="logits")
    module, info = ornis.load_pretrained_model(path, inference=True)  # format from the suffix
    assert isinstance(module, ExportedModel) and not isinstance(module, ornis.Encoder)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        emb = module.embedding(x)
        assert scale_err(emb, net.embedding(x)) < TOL
        assert scale_err(module.classify(emb), net(x)) < TOL
        assert scale_err(module.detection_features(x)["neck"], net.detection_features(x)["neck"]) < TOL
    assert info.custom_config["export"]["format"] == "pts"


@pytest.mark.parametrize("fmt", ["pt2", pytest.param("onnx", marks=needs_onnx)])
def test_vit_dynamic_size(tmp_path: Path, fmt: str) -> None:
    """One file for every input size whose sides are multiples of the patch size, the model's own size included
    (where the in-graph position-embedding interpolation must be exact)."""
    net = small_model("vit")
    path = tmp_path / f"vit_dynamic.{fmt}"
    report = export_model(net, path, output="features", dynamic_size=True)
    assert report.dynamic_size and len(report.checked_inputs) == 3
    for shape in ((1, 3, SIZE, SIZE), (3, 3, 48, 80), (2, 3, 112, 96)):
        assert_matches(path, fmt, net, "features", torch.randn(*shape))


@needs_onnx
def test_flexivit_patch_size_baked_in(tmp_path: Path) -> None:
    """FlexiViT exported at patch size 24 (the card's inference setting): the resampled patch embedding is a
    constant of the graph, and the size stays dynamic over multiples of 24."""
    net = small_model("flexivit")
    path = tmp_path / "flexi24.onnx"
    export_model(net, path, output="embedding", size=(72, 72), dynamic_size=True, patch_size=24)
    for shape in ((1, 3, 72, 72), (3, 3, 96, 48)):
        assert_matches(path, "onnx", net, "embedding", torch.randn(*shape), patch_size=24)
    assert read_export_metadata(path)["export"]["patch_size"] == 24


# -- bad input: a clear error and no file -------------------------------------------------------------------------
def test_unknown_format(tmp_path: Path) -> None:
    net = small_model("vit")
    with pytest.raises(ExportError, match=r"unknown export format 'tflite'.*pts, pt2, onnx"):
        export_model(net, tmp_path / "m.pts", format="tflite")
    with pytest.raises(ExportError, match=r"cannot tell the export format from the suffix 'bin'"):
        export_model(net, tmp_path / "m.bin")
    with pytest.raises(ExportError, match=r"unknown export output 'probabilities'"):
        export_model(net, tmp_path / "m.pt2", output="probabilities")
    assert leftovers(tmp_path) == []


def test_unwritable_output_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the output folder should be")
    with pytest.raises(ExportError, match=r"output folder .*not_a_folder/sub cannot be written \(Not a directory\)"):
        export_model(small_model("vit"), blocker / "sub" / "m.pt2")
    assert leftovers(tmp_path) == ["not_a_folder"]


def test_dynamic_size_refused(tmp_path: Path) -> None:
    with pytest.raises(
        ExportError, match=r"cannot be exported to pts with a dynamic input size: TorchScript .* traces"
    ):
        export_model(small_model("vit"), tmp_path / "vit.pts", dynamic_size=True)
    for family, why in (("hiera", "check_size"), ("hieradet", "padding of its attention windows")):
        net = small_model(family)
        for fmt in ("pt2", "onnx"):
            with pytest.raises(
                ExportError, match=rf"{net.name} cannot be exported to {fmt} with a dynamic input size: .*{why}"
            ):
                export_model(net, tmp_path / f"{family}.{fmt}", dynamic_size=True)
    assert leftovers(tmp_path) == []


def test_refused_requests(tmp_path: Path) -> None:
    headless = ornis.build_model("vit_t16", size=SIZE, config={"num_layers": 1})
    with pytest.raises(ExportError, match=r"no classification head"):
        export_model(headless, tmp_path / "m.pt2", output="logits")
    with pytest.raises(ExportError, match=r"patch_size .* fixed patch size"):
        export_model(small_model("hieradet"), tmp_path / "m.pt2", patch_size=24)
    assert leftovers(tmp_path) == []


def test_failed_check_deletes_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An exporter that gets the numbers wrong: the check catches it, the file is deleted, the error says by how
    much."""
    real_runner = check.exported_runner

    def off_by_a_bit(path, fmt, device):
        run = real_runner(path, fmt, device)
        return lambda x: [t + 1e-2 for t in run(x)]

    monkeypatch.setattr(check, "exported_runner", off_by_a_bit)
    net = small_model("vit")
    with pytest.raises(
        ExportCheckError, match=r"differs from the eager model by .* above the tolerance 0.0001; the file was deleted"
    ):
        export_model(net, tmp_path / "m.pts", output="embedding")
    assert leftovers(tmp_path) == []


def test_pt2_keeps_its_one_method_under_the_card_api_name(tmp_path: Path) -> None:
    """A .pt2 program has forward only: reachable as embedding when it computes the embedding; other methods say
    what the file computes instead of failing with an AttributeError."""
    net = small_model("vit")
    path = tmp_path / "vit.pt2"
    export_model(net, path, output="embedding")
    module, info = ornis.load_exported(path, inference=True)
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        assert scale_err(module.embedding(x), net.embedding(x)) < TOL
    with pytest.raises(ExportError, match=r"computes 'embedding' only"):
        module.classify(torch.randn(2, net.embedding_size))
    assert info.custom_config["export"]["format"] == "pt2" and not module.training


@pytest.mark.parametrize("fmt", ["pts", "pt2", pytest.param("onnx", marks=needs_onnx)])
def test_exported_file_mode_follows_the_umask(tmp_path: Path, fmt: str) -> None:
    """Written through a temporary file like every other ornis file: the mode is the umask's (0644 under 022), not
    mkstemp's 0600, in every format (each exporter writes its own way: torch.jit.save, torch.export.save, onnx)."""
    old = os.umask(0o022)
    try:
        export_model(small_model("vit"), tmp_path / f"vit.{fmt}", output="embedding")
    finally:
        os.umask(old)
    assert (tmp_path / f"vit.{fmt}").stat().st_mode & 0o777 == 0o644
    assert leftovers(tmp_path) == [f"vit.{fmt}"]


@pytest.mark.parametrize(
    ("size", "match"),
    [
        ((50, 50), r"vit_reg4_t16: export size \(50, 50\) is not two positive multiples of 16 \(the model's stride\)"),
        ((0, 0), r"export size \(0, 0\) is not two positive multiples of 16"),
        ((64, -64), r"export size \(64, -64\)"),
        (40, r"export size 40 is not two positive multiples of 16 \(the model.s stride\); e.g. \(64, 64\)"),
        ((64.0, 64.0), r"export size \(64.0, 64.0\)"),
    ],
    ids=["not-a-multiple", "zero", "negative", "int", "floats"],
)
def test_bad_export_size_is_refused_before_any_work(tmp_path: Path, monkeypatch, size, match) -> None:
    """Before: a ValueError from inside the model (50) or a RuntimeError from the convolution (0), after tracing."""
    monkeypatch.setattr("ornis.export.exporter.ExportHead", None)  # any work would fail with a TypeError
    with pytest.raises(ExportError, match=match):
        export_model(small_model("vit"), tmp_path / "m.pts", size=size)
    assert leftovers(tmp_path) == []


def test_hierarchical_export_size_steps_by_32(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("ornis.export.exporter.ExportHead", None)
    with pytest.raises(ExportError, match=r"hieradet_tiny: export size 48 is not two positive multiples of 32"):
        export_model(small_model("hieradet"), tmp_path / "m.pt2", size=48)


def test_output_that_is_a_folder_is_refused_before_any_work(tmp_path: Path, monkeypatch) -> None:
    """Before: the export ran, then the final rename failed with a bare IsADirectoryError."""
    monkeypatch.setattr("ornis.export.exporter.ExportHead", None)
    folder = tmp_path / "model.pts"
    folder.mkdir()
    with pytest.raises(ExportError, match=rf"^{folder} is a folder; the output names the file to write, e.g. "):
        export_model(small_model("vit"), folder)
    assert leftovers(tmp_path) == ["model.pts"] and leftovers(folder) == []


def test_export_arguments_out_of_range(tmp_path: Path) -> None:
    net = small_model("vit")
    with pytest.raises(ExportError, match=r"tolerance must be a number of at least 0, found nan"):
        export_model(net, tmp_path / "m.pts", tolerance=float("nan"))
    with pytest.raises(ExportError, match=r"check_batch must be an integer of at least 1, found 0"):
        export_model(net, tmp_path / "m.pts", check_batch=0)
    with pytest.raises(ExportError, match=r"patch_size must be a positive integer, found -8"):
        export_model(net, tmp_path / "m.pts", patch_size=-8)
    assert leftovers(tmp_path) == []


def test_cli_bad_export_requests_are_one_line_before_loading(tmp_path: Path, capsys, monkeypatch) -> None:
    from ornis.cli import export as cli_export
    from ornis.cli.main import main

    ckpt = ornis.save_model(small_model("vit"), tmp_path / "vit_reg4_t16_mine.pt", config=FAMILIES["vit"][1])
    (tmp_path / "dir.pts").mkdir()
    code = main(["export", str(ckpt), "-o", str(tmp_path / "m.pts"), "--size", "50", "50"])
    assert code == 1
    assert capsys.readouterr().err == (
        "ornis: error: vit_reg4_t16: export size (50, 50) is not two positive multiples of 16 (the model's stride); "
        "e.g. (64, 64)\n"
    )
    for args, code, message in [
        (["--size", "0", "0"], 2, "argument --size: 0 must be at least 1"),
        (["--batch", "0"], 2, "argument --batch: 0 must be at least 1"),
        (["--tolerance", "-1"], 2, "argument --tolerance: -1 must be at least 0.0"),
    ]:
        assert main(["export", str(ckpt), "-o", str(tmp_path / "m.pts"), *args]) == code
        assert message in capsys.readouterr().err
    # -o a folder is refused before the model is even loaded (a published model may be a download)
    monkeypatch.setattr(cli_export, "load_pretrained_model", None)
    assert main(["export", str(ckpt), "-o", str(tmp_path / "dir.pts")]) == 1
    err = capsys.readouterr().err
    folder = tmp_path / "dir.pts"
    assert err == f"ornis: error: {folder} is a folder; the output names the file to write, e.g. {folder}/model.pts\n"
    assert leftovers(tmp_path) == ["dir.pts", "vit_reg4_t16_mine.pt"]


def test_export_reports_its_success_once(tmp_path: Path, capsys, caplog) -> None:
    """The CLI prints the summary; the library no longer also logs it at INFO (two identical lines before)."""
    from ornis.cli.main import main

    ckpt = ornis.save_model(small_model("vit"), tmp_path / "vit_reg4_t16_mine.pt", config=FAMILIES["vit"][1])
    with caplog.at_level("INFO"):
        assert main(["export", str(ckpt), "-o", str(tmp_path / "m.pts"), "--batch", "1"]) == 0
    captured = capsys.readouterr()
    logged = [r.getMessage() for r in caplog.records if r.getMessage().startswith("exported ")]
    assert (captured.out + captured.err + "".join(logged)).count("exported embedding") == 1


def test_load_exported_rejects_other_files(tmp_path: Path) -> None:
    ckpt = ornis.save_model(small_model("vit"), tmp_path / "vit_reg4_t16_x.pt", class_to_idx=CLASSES)
    with pytest.raises(CheckpointFormatError, match=r"neither a TorchScript .* nor a torch.export"):
        load_exported(ckpt)
    with pytest.raises(CheckpointFormatError, match=r"no such file"):
        load_exported(tmp_path / "missing.pt2")


# -- the command ---------------------------------------------------------------------------------------------------
def test_cli_export_from_a_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from ornis.cli.main import main

    net = small_model("vit")
    ckpt = ornis.save_model(net, tmp_path / "vit_reg4_t16_mine.pt", class_to_idx=CLASSES, config=FAMILIES["vit"][1])
    out = tmp_path / "out" / "vit.pt2"
    code = main(["export", str(ckpt), "-o", str(out), "--returns", "logits", "--batch", "2"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "worst difference" in printed and "2x3x64x64" in printed
    assert_matches(out, "pt2", net, "logits", torch.randn(3, 3, SIZE, SIZE))
    assert read_export_metadata(out)["class_to_idx"] == CLASSES

    code = main(["export", str(ckpt), "-o", str(tmp_path / "vit.pts"), "--dynamic-size"])
    assert code == 1
    assert "dynamic input size" in capsys.readouterr().err
    assert not (tmp_path / "vit.pts").exists()

    # The old spelling of the output file still works
    code = main(["export", str(ckpt), "--output-file", str(tmp_path / "vit.pts"), "--batch", "1"])
    assert code == 0 and (tmp_path / "vit.pts").is_file()
