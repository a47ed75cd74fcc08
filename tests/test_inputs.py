"""One input layer: a tar shard or a folder yields the same samples (keys and bytes) to the batch runner's plan
(``plan_shards`` / ``ShardDataset``, what ``ornis embed`` reads) and to the training sources (``open_source``)."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from support.images import encode, random_rgb

from ornis.data.datasets import InputError, InputProblem, ShardDataset, plan_shards, read_plan_shard, write_plan
from ornis.data.decode import ImageDecodeError
from ornis.data.inputs import read_file_list, utf8_name
from ornis.data.tar import index_tar_samples, read_tar_member, scan_tar, split_member_name
from ornis.train.data import ImageFolderSource, TarShardSource, open_source


def _image(fmt: str, seed: int) -> bytes:
    return encode(random_rgb(12, 16, seed=seed), fmt)


# (member name, data) in stored order; None data: a directory member
TAR_MEMBERS: list[tuple[str, bytes | None]] = [
    ("._a.jpg", b"\x00\x05\x16\x07 macOS resource fork"),  # hidden: no key, as in webdataset
    ("a.jpg", _image("JPEG", 0)),
    ("a.cls", b"0\n"),
    ("b.x.png", _image("PNG", 1)),  # key "b", field "x.png": an image by its last extension
    ("dir", None),
    ("dir/c.JPEG", _image("JPEG", 2)),  # upper-case extension, a key with a folder
    ("d.webp", _image("WEBP", 3)),
    ("notes.txt", b"not an image"),  # a key without an image: no sample
    ("e.json", b"{}"),
    ("f.jpg", _image("JPEG", 4)),  # two images under one key: the first stored is the sample
    ("f.seg.png", _image("PNG", 5)),
    ("g.json", b"{}"),  # metadata before the image: the sample is where its image is
    ("g.png", _image("PNG", 6)),
    ("README", b"no dot, no field"),
]
TAR_KEYS = ["a", "b", "dir/c", "d", "f", "g"]
TAR_IMAGES = {"a": "a.jpg", "b": "b.x.png", "dir/c": "dir/c.JPEG", "d": "d.webp", "f": "f.jpg", "g": "g.png"}


def _write_tar(path: Path) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in TAR_MEMBERS:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tf.addfile(info)
            else:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


def _as_array(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image).copy())


def _planned(inputs: list[Path], tmp_path: Path, raw_jpeg: bool = False) -> tuple[list, ShardDataset]:
    shards, problems = plan_shards(inputs, shard_size=100)
    assert problems == []
    write_plan(shards, tmp_path / "plan.parquet")
    items = [item for shard in shards for item in shard.items]
    return items, ShardDataset(tmp_path / "plan.parquet", _as_array, raw_jpeg=raw_jpeg)


def test_member_names_split_by_the_webdataset_rule() -> None:
    assert split_member_name("a.jpg") == ("a", "jpg")
    assert split_member_name("b.x.png") == ("b", "x.png")
    assert split_member_name("dir/c.JPEG") == ("dir/c", "jpeg")
    assert split_member_name("x.y/z.tar.gz") == ("x.y/z", "tar.gz")
    assert split_member_name("README") == ("README", "")
    assert split_member_name("._a.jpg") is None
    assert split_member_name("dir/.hidden.png") is None


def test_a_tar_gives_the_same_samples_to_embed_and_train(tmp_path: Path) -> None:
    tar = _write_tar(tmp_path / "shard-000.tar")
    data = dict(m for m in TAR_MEMBERS if m[1] is not None)

    items, dataset = _planned([tar], tmp_path)
    assert [i.key for i in items] == [f"{tar}:{k}" for k in TAR_KEYS]
    source = open_source(tar, labelled=False)
    assert isinstance(source, TarShardSource)
    assert [source.name(i) for i in range(len(source))] == [f"{tar}:{k}" for k in TAR_KEYS]
    assert [m.key for m in source.members] == TAR_KEYS

    for i, (item, member) in enumerate(zip(items, source.members)):
        expected = data[TAR_IMAGES[member.key]]
        assert (item.offset, item.size) == (member.offset, member.size)
        assert read_tar_member(item.path, item.offset, item.size, item.key) == expected
        sample = dataset[(0, i)]
        image, label = source.read(i)
        assert sample.ok and label == -1
        assert torch.equal(sample.pixels, _as_array(image))
        assert (sample.width, sample.height) == image.size == (16, 12)

    # JPEGs left for the device decoder come back as the member's own bytes
    _, raw = _planned([tar], tmp_path, raw_jpeg=True)
    for i, key in enumerate(TAR_KEYS):
        sample = raw[(0, i)]
        if TAR_IMAGES[key].lower().endswith(".jpg") or TAR_IMAGES[key].lower().endswith(".jpeg"):
            assert bytes(sample.jpeg.numpy()) == data[TAR_IMAGES[key]]
        else:
            assert sample.jpeg is None and sample.pixels is not None


def test_tar_labels_come_from_cls_members(tmp_path: Path) -> None:
    tar = _write_tar(tmp_path / "shard-000.tar")
    source = open_source(tar, labelled=True)
    assert [(m.key, m.label) for m in source.members] == [("a", 0)] + [(k, -1) for k in TAR_KEYS[1:]]
    assert source.class_to_idx == {"0": 0}
    assert [s.label for s in index_tar_samples(tar)] == [None] * len(TAR_KEYS)  # labels only read when asked


def test_a_truncated_tar_member_is_the_same_error_for_both(tmp_path: Path) -> None:
    tar = _write_tar(tmp_path / "shard-000.tar")
    items, dataset = _planned([tar], tmp_path)
    source = open_source(tar, labelled=False)
    last = items[-1]
    with open(tar, "r+b") as f:
        f.truncate(last.offset + last.size // 2)
    sample = dataset[(0, len(items) - 1)]
    assert not sample.ok and sample.reason.startswith("truncated tar member")
    with pytest.raises(ImageDecodeError, match="truncated tar member"):
        source.read(len(source) - 1)


FOLDER_FILES = [
    "a.jpg",
    "B.JPG",
    "c.Png",
    "d.jpeg",
    "z.jpg",
    "notes.txt",
    "noext",
    ".hidden.jpg",
    "._a.jpg",
    ".cache/x.jpg",
    "dir.jpg/h.png",  # a folder named like an image is walked, not taken
    "sub/e.webp",
    "sub/.f.png",
    "sub/deeper/g.bmp",
]
# sorted walk: a folder's own files (by name: upper case first) before its sub-folders
FOLDER_IMAGES = ["B.JPG", "a.jpg", "c.Png", "d.jpeg", "z.jpg", "dir.jpg/h.png", "sub/e.webp", "sub/deeper/g.bmp"]
FORMATS = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}


def _write_folder(root: Path) -> Path:
    for i, name in enumerate(FOLDER_FILES):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fmt = FORMATS.get(path.suffix.lower())
        path.write_bytes(_image(fmt, i) if fmt else b"not an image")
    return root


def test_a_folder_gives_the_same_samples_to_embed_and_train(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos")
    expected = [str(root / name) for name in FOLDER_IMAGES]

    items, dataset = _planned([root], tmp_path)
    assert [i.key for i in items] == [i.path for i in items] == expected
    source = open_source(root, labelled=False)
    assert isinstance(source, ImageFolderSource)
    assert [source.name(i) for i in range(len(source))] == expected
    for i in range(len(items)):
        sample = dataset[(0, i)]
        image, label = source.read(i)
        assert sample.ok and label == -1
        assert torch.equal(sample.pixels, _as_array(image))


def test_labelled_folder_classes_skip_hidden_folders_and_files(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos" / "cats").parent
    _write_folder(root / ".trash")
    source = open_source(root, labelled=True)
    assert source.class_to_idx == {"cats": 0}
    assert [source.name(i) for i in range(len(source))] == [str(root / "cats" / n) for n in FOLDER_IMAGES]


def test_a_folder_of_shards_is_read_as_shards(tmp_path: Path) -> None:
    tars = [_write_tar(tmp_path / f"shard-{i:03d}.tar") for i in (1, 0)]
    (tmp_path / "._shard-002.tar").write_bytes(b"macOS resource fork")  # hidden: not a shard
    (tmp_path / "notes.txt").write_text("a folder of shards may hold other files")
    source = open_source(tmp_path, labelled=False)
    assert isinstance(source, TarShardSource)
    assert [source.name(i) for i in range(len(source))] == [f"{t}:{k}" for t in sorted(tars) for k in TAR_KEYS]


def _tar_bytes(count: int) -> tuple[bytes, list[int]]:
    """A tar of ``count`` PNG members, and the byte offset where each member (data and padding) ends."""
    buf, ends = io.BytesIO(), []
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for i in range(count):
            data = _image("PNG", i)
            info = tarfile.TarInfo(f"s{i}.png")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
            ends.append(buf.tell())
    return buf.getvalue(), ends


def test_a_tar_cut_at_a_member_boundary_is_reported(tmp_path: Path) -> None:
    whole, ends = _tar_bytes(6)
    assert scan_tar(_write_tar(tmp_path / "whole.tar")).problem is None
    (tmp_path / "ok.tar").write_bytes(whole)
    assert scan_tar(tmp_path / "ok.tar") == (scan_tar(tmp_path / "ok.tar").samples, None)
    (tmp_path / "cut.tar").write_bytes(whole[: ends[3]])
    index = scan_tar(tmp_path / "cut.tar")
    assert [s.key for s in index.samples] == ["s0", "s1", "s2", "s3"]
    assert index.problem == (
        f"truncated tar: it ends at byte {ends[3]} without the end-of-archive block (4 samples before it are used)"
    )
    (tmp_path / "junk.tar").write_bytes(whole[: ends[1]] + b"\x01" * 512 + whole[ends[1] :])
    junk = scan_tar(tmp_path / "junk.tar")
    assert len(junk.samples) == 2 and junk.problem.startswith(f"unreadable tar header at byte {ends[1]}")
    shards, problems = plan_shards([tmp_path / "cut.tar"], shard_size=10)
    assert [len(s.items) for s in shards] == [4]
    assert problems == [InputProblem(str(tmp_path / "cut.tar"), index.problem)]


def test_names_that_are_not_utf8_survive_the_plan(tmp_path: Path) -> None:
    folder = tmp_path / "old archive"
    folder.mkdir()
    raw = os.path.join(os.fsencode(folder), b"bad\xffbyte.jpg")
    with open(raw, "wb") as f:
        f.write(_image("JPEG", 0))
    shards, _ = plan_shards([folder], shard_size=10)
    write_plan(shards, tmp_path / "plan.parquet")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old archive", "plan.parquet"]  # no temporary left
    (item,) = read_plan_shard(tmp_path / "plan.parquet", 0)
    assert os.fsencode(item.path) == raw and item.key == item.path
    assert utf8_name(item.key) == f"{folder}/bad\\xffbyte.jpg"
    assert ShardDataset(tmp_path / "plan.parquet", _as_array)[(0, 0)].ok


def test_one_file_under_two_spellings_is_planned_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write_folder(tmp_path / "photos")
    monkeypatch.chdir(tmp_path)
    shards, _ = plan_shards(["photos", "./photos//a.jpg", str(root / "sub" / ".." / "z.jpg")], shard_size=100)
    assert [i.key for i in shards[0].items] == [os.path.join("photos", n) for n in FOLDER_IMAGES]


def test_empty_inputs_and_bad_lists_are_input_errors(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(InputError, match="no images found in .*empty"):
        plan_shards([tmp_path / "empty"])
    (tmp_path / "labels.csv").write_text("label,where\nbird,a.jpg\n")
    with pytest.raises(InputError, match="labels.csv: expected a column named one of path.*found 'label', 'where'"):
        read_file_list(tmp_path / "labels.csv")
    (tmp_path / "bare.csv").write_text("a.jpg\nsub/b.png\n")  # one column of image names: a header-less list
    assert read_file_list(tmp_path / "bare.csv") == [str(tmp_path / "a.jpg"), str(tmp_path / "sub" / "b.png")]
    (tmp_path / "junk.parquet").write_bytes(b"not parquet" * 20)
    with pytest.raises(InputError, match="junk.parquet: not a Parquet file list"):
        read_file_list(tmp_path / "junk.parquet")


def test_a_folder_that_cannot_be_listed_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = _write_folder(tmp_path / "photos")
    scandir = os.scandir

    def refusing(path="."):  # what chmod 000 does to anyone but root, and these tests may run as root
        if os.fspath(path) == str(root / "sub"):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", refusing)
    shards, problems = plan_shards([root], shard_size=100)
    assert problems == [InputProblem(str(root / "sub"), "cannot list folder (Permission denied)")]
    assert len(shards[0].items) == len(FOLDER_IMAGES) - 2
