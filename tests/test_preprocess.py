"""One preprocessing path: every good kind of image (16-bit grayscale, palette, CMYK and RGBA among them) gives the
same RGB pixels, the same model input and the same embedding through ``infer_image`` as through the batch runner
(``ornis embed``)."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from support.images import make_good_images

import ornis
from ornis.data.datasets import ShardDataset
from ornis.inference.batch import embed
from ornis.inference.classification import infer_image
from ornis.inference.preprocess import normalize_on_device, open_rgb, split_transform

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("preprocess")
    torch.manual_seed(0)
    net = ornis.build_model("vit_t16", num_classes=4, size=32)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.05)
    checkpoint = ornis.save_model(net, root / "vit_t16_tiny.pt")
    images = make_good_images(root / "images")
    out = root / "out"
    embed([root / "images"], model=checkpoint, out=out, batch_size=1, num_workers=0, progress=False, device="cpu")
    net, info = ornis.load_pretrained_model(checkpoint, inference=True)
    transform = ornis.classification_transform(ornis.get_size_from_signature(info.signature), info.rgb_stats)
    return images, out, net, transform


def test_the_odd_modes_are_among_the_images(setup) -> None:
    images, *_ = setup
    modes = {k: Image.open(p).mode for k, p in images.items()}
    for kind, mode in {"gray16_png": "I;16", "palette_png": "P", "cmyk_jpeg": "CMYK", "rgba_png": "RGBA"}.items():
        assert modes[kind] == mode, (kind, modes[kind])


def test_sixteen_bits_are_scaled_not_clipped(setup) -> None:
    images, *_ = setup
    pixels = np.asarray(open_rgb(images["gray16_png"]))
    assert pixels.min() == 0 and pixels.max() == 255
    assert (pixels == 255).mean() < 0.01  # Pillow's own convert("RGB") makes nearly all of it white


def test_path_and_pil_image_give_the_same_rgb(setup) -> None:
    images, *_ = setup
    for kind, path in images.items():
        with Image.open(path) as image:
            np.testing.assert_array_equal(np.asarray(open_rgb(image)), np.asarray(open_rgb(path)), err_msg=kind)


def test_model_input_is_identical_through_both_paths(setup) -> None:
    images, out, _, transform = setup
    worker_part, norm = split_transform(transform)
    assert norm is not None
    dataset = ShardDataset(out / "_plan.parquet", worker_part)
    keys = [item.key for item in dataset.items(0)]
    for kind, path in images.items():
        sample = dataset[(0, keys.index(str(path)))]
        assert sample.ok and sample.pixels is not None, (kind, sample.reason)
        batch_input = normalize_on_device(sample.pixels.unsqueeze(0), norm)[0]
        single_input = transform(open_rgb(path))
        assert torch.equal(batch_input, single_input), kind


def test_embeddings_are_identical_through_both_paths(setup) -> None:
    images, out, net, transform = setup
    rows = {r["path"]: r["embedding"] for r in pq.read_table(out).to_pylist()}
    assert sorted(rows) == sorted(str(p) for p in images.values())
    for kind, path in images.items():
        _, expected = infer_image(net, path, transform, return_embedding=True)
        np.testing.assert_array_equal(np.asarray(rows[str(path)], np.float32), expected[0], err_msg=kind)


def test_infer_image_on_a_pil_image_equals_the_batch_row(setup) -> None:
    # Item 9 of the bad-input report: a 16-bit grayscale PIL image (and every other odd mode) given to infer_image
    # must give the row ornis embed writes for its file, not Pillow's clipped conversion
    images, out, net, transform = setup
    rows = {r["path"]: r["embedding"] for r in pq.read_table(out).to_pylist()}
    for kind, path in images.items():
        with Image.open(path) as image:
            _, expected = infer_image(net, image, transform, return_embedding=True)
        np.testing.assert_array_equal(np.asarray(rows[str(path)], np.float32), expected[0], err_msg=kind)
    with Image.open(images["gray16_png"]) as image:
        _, clipped = infer_image(net, image.convert("RGB"), transform, return_embedding=True)
    row = np.asarray(rows[str(images["gray16_png"])], np.float32)
    cosine = float(row @ clipped[0] / np.linalg.norm(row) / np.linalg.norm(clipped[0]))
    assert cosine < 0.99, cosine  # the clipped conversion really is another input
