"""Bad input gives a typed error that names the file and what was expected; nothing unsafe ever runs."""

from __future__ import annotations

import os
import pickle
import zipfile

import pytest
import torch

import ornis
from ornis.errors import CheckpointFormatError, StateDictMismatchError, UnknownModelError


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "vit_reg1_t16_nps_ls_test.pt"
    ornis.save_model(ornis.build_model("vit_reg1_t16_nps_ls", num_classes=3, size=64), path)
    return path


def test_unknown_name_suggests_the_closest() -> None:
    with pytest.raises(UnknownModelError) as e:
        ornis.load_pretrained_model("flexivit_reg1_s16_rms_ls_dino-v2-il-al")
    assert "flexivit_reg1_s16_rms_ls_dino-v2-il-all" in str(e.value)
    assert e.value.suggestions[0] == "flexivit_reg1_s16_rms_ls_dino-v2-il-all"
    with pytest.raises(UnknownModelError, match="no suggestion|unknown model 'zzz'"):
        ornis.load_pretrained_model("zzz")


def test_architecture_name_without_weights_is_explained() -> None:
    with pytest.raises(ornis.OrnisError, match=r"architecture without published weights.*build_model"):
        ornis.load_pretrained_model("vit_b16")


def test_checkpoint_of_another_architecture(small_ckpt, tmp_path) -> None:
    with pytest.raises(StateDictMismatchError) as e:
        ornis.load_pretrained_model(small_ckpt, network="vit_reg4_t16_nps_ls")
    err = e.value
    assert err.path == small_ckpt and err.architecture == "vit_reg4_t16_nps_ls"
    assert err.mismatched == [("reg_tokens", (1, 4, 192), (1, 1, 192))]
    assert str(small_ckpt) in str(err) and "reg_tokens expected (1, 4, 192) found (1, 1, 192)" in str(err)

    with pytest.raises(StateDictMismatchError) as e:
        ornis.load_pretrained_model(small_ckpt, network="vit_t16_nps_ls")
    assert e.value.unexpected == ["reg_tokens"] and e.value.missing == []

    # Misnamed on disk: the file name says one architecture, the tensors another (and no network entry)
    ckpt = torch.load(small_ckpt, weights_only=True)
    del ckpt["network"]
    misnamed = tmp_path / "vit_s16_oops.pt"
    torch.save(ckpt, misnamed)
    with pytest.raises(StateDictMismatchError, match=r"vit_s16.*shape mismatch"):
        ornis.load_pretrained_model(misnamed)


def test_non_strict_load_reports_the_keys(small_ckpt) -> None:
    net, info = ornis.load_pretrained_model(small_ckpt, network="vit_t16_nps_ls", strict=False)
    assert info.custom_config["load_report"] == {"missing": [], "unexpected": ["reg_tokens"]}
    assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 3)


def test_architecture_found_from_tensor_shapes(small_ckpt, tmp_path) -> None:
    """A file with no network entry and an uninformative name is identified by its shapes."""
    ckpt = torch.load(small_ckpt, weights_only=True)
    del ckpt["network"]
    anonymous = tmp_path / "model.pt"
    torch.save(ckpt, anonymous)
    net, _ = ornis.load_pretrained_model(anonymous)
    assert net.name == "vit_reg1_t16_nps_ls"


def test_truncated_file(small_ckpt, tmp_path) -> None:
    cut = tmp_path / "cut.pt"
    data = small_ckpt.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt") as e:
        ornis.load_pretrained_model(cut)
    assert e.value.path == cut


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "empty"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200), "not a checkpoint"),
        (b"hello, I am a text file\n" * 10, "not a checkpoint"),
    ],
    ids=["empty", "jpeg", "text"],
)
def test_not_a_checkpoint(tmp_path, content, match) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match=match) as e:
        ornis.load_pretrained_model(path)
    assert str(path) in str(e.value)


def test_zip_that_is_not_a_checkpoint(tmp_path) -> None:
    path = tmp_path / "archive.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("readme.txt", "not a model")
    with pytest.raises(CheckpointFormatError, match=str(path)):
        ornis.load_pretrained_model(path)


def test_dict_without_the_published_keys(tmp_path) -> None:
    path = tmp_path / "bare_state.pt"
    torch.save({"model": {"w": torch.zeros(2)}}, path)
    with pytest.raises(
        CheckpointFormatError, match=r"missing state, task, signature, class_to_idx, rgb_stats \(found model\)"
    ):
        ornis.load_pretrained_model(path)


class _Exploit:
    """Unpickling this runs a shell command, were anyone to unpickle it fully."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("layout", ["torch_zip", "raw_pickle"])
def test_malicious_pickle_runs_nothing(tmp_path, layout) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "vit_t16_evil.pt"
    payload = {"state": _Exploit(str(marker)), "task": "x", "signature": {}, "class_to_idx": {}, "rgb_stats": {}}
    if layout == "torch_zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    with pytest.raises(CheckpointFormatError, match="refused to unpickle") as e:
        ornis.load_pretrained_model(path)
    assert e.value.path == path
    assert not marker.exists()
    # The payload is real: full unpickling would have run it (looked at here as bytes, which runs nothing)
    assert b"system" in _pickle_bytes(path)


def _pickle_bytes(path) -> bytes:
    if not zipfile.is_zipfile(path):
        return path.read_bytes()
    with zipfile.ZipFile(path) as z:
        return z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))


def test_missing_published_file_says_where_to_put_it(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("ORNIS_CACHE", str(tmp_path))
    monkeypatch.setenv("ORNIS_OFFLINE", "1")
    with pytest.raises(ornis.WeightsNotFoundError) as e:
        ornis.load_pretrained_model("hieradet_d_small_dino-v2")
    msg = str(e.value)
    assert str(tmp_path / "weights" / "hieradet_d_small_dino-v2.pt") in msg
    assert (
        "https://huggingface.co/birder-project/hieradet_d_small_dino-v2/resolve/main/hieradet_d_small_dino-v2.pt" in msg
    )


def test_input_not_a_multiple_of_the_patch_size() -> None:
    net = ornis.build_model("vit_t16", size=64)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        net(torch.zeros(1, 3, 64, 70))


@pytest.mark.parametrize(
    ("value", "found"),
    [(None, "NoneType None"), (42, "int 42"), (b"flexivit.pt", "bytes b'flexivit.pt'"), (3.5, "float 3.5")],
    ids=["none", "int", "bytes", "float"],
)
def test_load_pretrained_model_names_the_argument_of_a_wrong_type(value, found) -> None:
    """Not "argument of type 'NoneType' is not iterable": the argument, the accepted types and what was found."""
    with pytest.raises(TypeError) as e:
        ornis.load_pretrained_model(value)
    assert str(e.value) == (
        f"weights must be a published model name or a checkpoint path (str or os.PathLike), found {found}"
    )
    with pytest.raises(TypeError, match=r"^dst must be a published model name or a checkpoint path"):
        ornis.load_pretrained_model("ornis_shapes_vit_tiny", dst=7)
    with pytest.raises(ValueError, match=r"^weights is empty; expected a published model name"):
        ornis.load_pretrained_model("  ")


@pytest.mark.parametrize(
    "content",
    [b"\x80\x02" + bytes(range(256)) * 4, b"\x80\x04junk that is no pickle" * 8],
    ids=["pickle-header-then-bytes", "pickle-header-then-text"],
)
def test_junk_behind_a_pickle_header(tmp_path, content) -> None:
    """Whatever the unpickler trips on (KeyError, IndexError, an unknown opcode...), it is one typed error naming
    the file, never the unpickler's own exception."""
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointFormatError, match="truncated or corrupt") as e:
        ornis.load_pretrained_model(path)
    assert e.value.path == path and "weights_only" not in str(e.value)


def test_a_folder_or_a_fifo_is_not_called_missing(tmp_path) -> None:
    """ "no such file" for a path that is there sends the user looking in the wrong place."""
    folder = tmp_path / "weights.pt"
    folder.mkdir()
    with pytest.raises(CheckpointFormatError, match=r"weights.pt: a folder; expected a checkpoint file$"):
        ornis.load_pretrained_model(folder)
    fifo = tmp_path / "pipe.pt"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointFormatError, match=r"pipe.pt: not a regular file \(a pipe, socket or device\)"):
        ornis.load_pretrained_model(fifo)
    export = tmp_path / "model.pts"
    export.mkdir()
    with pytest.raises(CheckpointFormatError, match=r"model.pts: a folder; expected a checkpoint file$"):
        ornis.load_pretrained_model(export)
