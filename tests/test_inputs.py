"""One input layer: a tar shard or a folder yields the same samples (keys and bytes) to the batch runner's plan
(``plan_shards`` / ``ShardDataset``, what ``ornis embed`` reads) and to the training sources (``open_source``)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from support.images import encode, random_rgb

from ornis.data.datasets import ShardDataset, plan_shards, write_plan
from ornis.data.decode import ImageDecodeError
from ornis.data.tar import index_tar_samples, read_tar_member, split_member_name
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
