"""Palette, colour masks, overlays, legends and `ciss predict`'s files, with a tiny resnet18 model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from model_helpers import NAMES, _noise, _save_model
from PIL import Image

from ciss_daemon.exceptions import CissError
from ciss_daemon.outputs.predict import (
    colour_mask,
    expand_inputs,
    overlay,
    palette,
    predict_images,
    with_legend,
)
from engine.evaluate import predict_labels
from engine.exceptions import CheckpointError
from engine.model import upsample
from engine.transforms import normalize_image


def test_palette_follows_the_voc_scheme_and_is_distinct() -> None:
    colours = palette(300)
    assert colours.shape == (301, 3) and colours.dtype == np.uint8
    assert colours[0].tolist() == [0, 0, 0]
    assert colours[1].tolist() == [128, 0, 0]
    assert colours[2].tolist() == [0, 128, 0]
    assert colours[15].tolist() == [192, 128, 128]  # VOC "person"
    assert len({tuple(c) for c in colours}) == 301
    np.testing.assert_array_equal(palette(5), colours[:6])  # a class keeps its colour as classes arrive


def test_colour_mask_paints_each_id_and_ignore_white() -> None:
    colours = palette(2)
    labels = np.array([[0, 1], [2, 255]], dtype=np.int64)
    rgb = np.asarray(colour_mask(labels, colours))
    assert rgb.shape == (2, 2, 3)
    assert rgb[0, 0].tolist() == [0, 0, 0]
    assert rgb[0, 1].tolist() == colours[1].tolist()
    assert rgb[1, 0].tolist() == colours[2].tolist()
    assert rgb[1, 1].tolist() == [255, 255, 255]


def test_overlay_tints_labelled_pixels_only() -> None:
    image = Image.new("RGB", (2, 1), (100, 50, 200))
    labels = np.array([[0, 1]])
    out = np.asarray(overlay(image, labels, palette(1), alpha=0.25))
    assert out[0, 0].tolist() == [100, 50, 200]
    assert out[0, 1].tolist() == [round(0.75 * 100 + 0.25 * 128), round(0.75 * 50), round(0.75 * 200)]


def test_legend_lists_the_present_classes_beside_the_untouched_image() -> None:
    colours = palette(2)
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    out = with_legend(image, NAMES, colours, present=[0, 2])
    pixels = np.asarray(out)
    assert out.width > image.width and out.height >= image.height
    assert (pixels[:8, :8] == [10, 20, 30]).all()
    strip = {tuple(p) for p in pixels[:, 8:].reshape(-1, 3)}
    assert tuple(colours[2]) in strip
    assert tuple(colours[1]) not in strip  # class 1 is absent, so it has no swatch
    taller = with_legend(image, {k: f"class number {k}" for k in range(1, 11)}, palette(10))
    assert taller.height > out.height  # ten rows do not fit in 8 pixels: the canvas grows


def test_expand_inputs_lists_folder_images_sorted_and_skips_outputs(tmp_path: Path) -> None:
    for name in ("b.png", "a.JPG", "c.jpeg", "a.colour.png", ".hidden.png"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "d.png").write_bytes(b"")
    single = tmp_path / "notes.txt"
    assert expand_inputs([tmp_path, single, tmp_path / "b.png"]) == [
        tmp_path / "a.JPG",
        tmp_path / "b.png",
        tmp_path / "c.jpeg",
        single,
    ]


def test_expand_inputs_names_every_missing_path_and_empty_folders(tmp_path: Path) -> None:
    with pytest.raises(CissError, match=r"no such file or folder: .*nope1, .*nope2; check the paths"):
        expand_inputs([tmp_path / "nope1", tmp_path, tmp_path / "nope2"])
    with pytest.raises(CissError, match=r"holds no \.jpg, \.jpeg or \.png image"):
        expand_inputs([tmp_path])


def test_predict_images_writes_the_model_prediction(tmp_path: Path) -> None:
    model = _save_model(tmp_path / "model")
    small = _noise(tmp_path / "in" / "small.png", (40, 24), seed=1)
    _noise(tmp_path / "in" / "big.jpg", (96, 48), seed=2)
    (tmp_path / "in" / "broken.png").write_bytes(b"not a png")
    images = expand_inputs([tmp_path / "in"])
    calls: list[tuple[int, int]] = []

    results = predict_images(
        tmp_path / "model", images, tmp_path / "out", progress=lambda d, t: calls.append((d, t)), max_size=64
    )

    assert calls == [(1, 3), (2, 3), (3, 3)]
    by_name = {r.image.name: r for r in results}
    assert not by_name["broken.png"].ok and "broken.png" in by_name["broken.png"].error
    assert "\n" not in by_name["broken.png"].error
    with torch.no_grad():
        pixels = normalize_image(small)[None]  # (1, 3, 24, 40)
        expected = predict_labels(upsample(model(pixels).logits, (24, 40)))[0].numpy()
    written = Image.open(by_name["small.png"].labels)
    assert written.mode == "L"
    np.testing.assert_array_equal(np.asarray(written), expected)
    assert by_name["small.png"].classes == tuple(int(k) for k in np.unique(expected) if k)
    big = Image.open(by_name["big.jpg"].labels)
    assert big.size == (96, 48)  # predicted at 64x32, labels enlarged back to the image
    assert set(np.unique(np.asarray(big))) <= {0, 1, 2}
    for files in (by_name["small.png"], by_name["big.jpg"]):
        assert Image.open(files.colour).width > Image.open(files.image).width
        assert Image.open(files.overlay).height >= Image.open(files.image).height


def test_predict_images_colours_the_predicted_class(tmp_path: Path) -> None:
    _save_model(tmp_path / "model", favour=2)
    image = _noise(tmp_path / "a" / "x.png", (32, 32), seed=3)
    _noise(tmp_path / "b" / "x.png", (32, 32), seed=4)
    results = predict_images(
        tmp_path / "model", [tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"], tmp_path
    )
    assert [r.labels.name for r in results] == ["x.labels.png", "x-2.labels.png"]  # no overwrite
    assert (np.asarray(Image.open(results[0].labels)) == 2).all()
    assert results[0].classes == (2,)
    colour = np.asarray(Image.open(results[0].colour))
    assert colour[0, 0].tolist() == palette(2)[2].tolist()
    tinted = np.asarray(Image.open(results[0].overlay))[:32, :32]
    expected = np.asarray(overlay(image, np.full((32, 32), 2), palette(2)))
    np.testing.assert_array_equal(tinted, expected)


def test_predict_images_refuses_a_missing_model(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="nomodel has no"):
        predict_images(tmp_path / "nomodel", [], tmp_path / "out")
