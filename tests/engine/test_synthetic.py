"""Tests of engine.synthetic: classes, protocol parsing, rendering and the generated batch folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine.data import list_pairs, read_manifest
from engine.exceptions import ConfigError, DataError
from engine.synthetic import CLASSES, SYNTH_CLASSES, generate_batches, parse_protocol, render_sample

PROTOCOL = "4-2-2"  # 8 classes, 3 steps: small enough to generate in a few hundred milliseconds
SIZE = 32


def generate(out: Path, **overrides) -> list[Path]:
    settings = dict(train_per_step=8, val_per_step=3, image_size=SIZE, seed=7, eval_batch=10)
    settings.update(overrides)
    return generate_batches(out, PROTOCOL, **settings)


@pytest.fixture(scope="module")
def batches(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return generate(tmp_path_factory.mktemp("synth"))


def masks_of(folder: Path, split: str = "train") -> list[np.ndarray]:
    return [np.array(Image.open(mask)) for _, mask in list_pairs(folder, split)]


def saturated(image_path: Path) -> np.ndarray:
    """Pixels of a vivid class colour: the background and clutter are desaturated and never reach this."""
    pixels = np.array(Image.open(image_path)).astype(int)  # (H, W, 3)
    return pixels.max(axis=2) - pixels.min(axis=2) > 90


def test_classes_are_many_and_distinct() -> None:
    assert len(SYNTH_CLASSES) >= 20 and len(set(SYNTH_CLASSES)) == len(SYNTH_CLASSES)
    assert len({(c.shape, c.colour) for c in CLASSES}) == len(CLASSES)
    assert SYNTH_CLASSES[0] == "red-disc" and "striped-blue-disc" in SYNTH_CLASSES


def test_parse_protocol() -> None:
    assert parse_protocol("10-2-2-2-2") == [10, 2, 2, 2, 2]
    assert parse_protocol("15-1", num_classes=20) == [15, 1, 1, 1, 1, 1]
    assert parse_protocol("10-5", num_classes=15) == [10, 5]
    for bad in ("", "10-", "ten-2", "10-0", "-3"):
        with pytest.raises(ConfigError, match="should be positive class counts joined by '-'"):
            parse_protocol(bad)
    with pytest.raises(ConfigError, match="does not add up to 20 classes"):
        parse_protocol("15-2", num_classes=20)
    with pytest.raises(ConfigError, match="does not add up to 10 classes"):
        parse_protocol("15-1", num_classes=10)


def test_render_sample_is_deterministic_and_shows_the_required_class() -> None:
    image, labels = render_sample(np.random.default_rng(3), 48, 5, [1, 2, 3])
    again, labels_again = render_sample(np.random.default_rng(3), 48, 5, [1, 2, 3])
    assert image.shape == (48, 48, 3) and image.dtype == np.uint8 and labels.shape == (48, 48)
    assert np.array_equal(image, again) and np.array_equal(labels, labels_again)
    assert (labels == 5).sum() > 20 and set(np.unique(labels)) <= {0, 1, 2, 3, 5}
    assert (labels == 0).mean() > 0.3  # there is background around the objects


def test_objects_bounds_how_many_classes_an_image_shows() -> None:
    # The default (2, 5) is what render_sample always drew: the same generator state gives the same image.
    image, labels = render_sample(np.random.default_rng(4), 48, 5, [1, 2, 3])
    again, labels_again = render_sample(np.random.default_rng(4), 48, 5, [1, 2, 3], objects=(2, 5))
    assert np.array_equal(image, again) and np.array_equal(labels, labels_again)
    shown = [
        set(np.unique(render_sample(np.random.default_rng(i), 48, 5, [1, 2, 3], objects=(1, 1))[1]))
        for i in range(20)
    ]
    assert all(classes == {0, 5} for classes in shown)  # one object: the required class alone
    extras = [
        len(
            set(np.unique(render_sample(np.random.default_rng(i), 48, 5, [1, 2, 3], objects=(4, 4))[1]))
            - {0, 5}
        )
        for i in range(20)
    ]
    assert max(extras) >= 2  # three extra objects, of up to three classes, some hidden under others


def test_same_seed_writes_identical_bytes(tmp_path: Path, batches: list[Path]) -> None:
    again = generate(tmp_path / "again")
    files = sorted(p.relative_to(batches[0].parent) for b in batches for p in b.rglob("*") if p.is_file())
    files_again = sorted(
        p.relative_to(tmp_path / "again") for b in again for p in b.rglob("*") if p.is_file()
    )
    assert files == files_again
    assert all((batches[0].parent / f).read_bytes() == (tmp_path / "again" / f).read_bytes() for f in files)
    other = generate(tmp_path / "other", seed=8)
    image = Path("images/0000.png")
    assert (other[0] / image).read_bytes() != (batches[0] / image).read_bytes()


def test_batches_are_valid_and_labelled_with_their_own_values(batches: list[Path]) -> None:
    assert [b.name for b in batches] == ["synth-00-base", "synth-01", "synth-02", "synth-eval"]
    assert not list(batches[0].parent.rglob(".batch.toml.tmp"))
    names = []
    for folder, first in zip(batches[:3], (0, 4, 6), strict=True):
        manifest = read_manifest(folder)
        values = sorted(manifest.classes)
        assert manifest.kind == "train" and values == list(range(1, len(values) + 1))
        assert list(manifest.classes.values()) == SYNTH_CLASSES[first : first + len(values)]
        names += manifest.classes.values()
        train_masks = masks_of(folder)
        assert len(train_masks) == 8 and len(masks_of(folder, "val")) == 3
        for split in ("train", "val"):
            for image_path, mask_path in list_pairs(folder, split):
                assert Image.open(mask_path).mode == "L"
                assert Image.open(image_path).size == Image.open(mask_path).size == (SIZE, SIZE)
                assert set(np.unique(np.array(Image.open(mask_path)))) <= {0, *values}
        assert all(mask.any() for mask in train_masks)  # each image shows a class of its step
        assert set(np.unique(np.concatenate(train_masks))) == {0, *values}  # every class has pixels
    assert len(set(names)) == 8


def test_eval_batch_is_fully_labelled(batches: list[Path]) -> None:
    manifest = read_manifest(batches[-1])
    assert manifest.kind == "eval" and manifest.classes == {k: SYNTH_CLASSES[k - 1] for k in range(1, 9)}
    pairs = list_pairs(batches[-1])
    masks = [np.array(Image.open(mask)) for _, mask in pairs]
    assert set(np.unique(np.concatenate(masks))) == set(range(9))
    # every vivid pixel is an object, and here every object is labelled
    assert all(mask[saturated(image)].all() for (image, _), mask in zip(pairs, masks, strict=True))
    # several objects per image: count the distinct visible classes, a lower bound on the objects
    assert np.mean([len(np.unique(mask[mask > 0])) for mask in masks]) >= 2


def test_step_batches_leave_other_classes_unlabelled(tmp_path: Path, batches: list[Path]) -> None:
    def unlabelled_vivid(folder: Path) -> int:
        return sum(
            int((saturated(image) & (np.array(Image.open(mask)) == 0)).sum())
            for image, mask in list_pairs(folder)
        )

    # overlap: later classes appear in the base step but are background there
    assert unlabelled_vivid(batches[0]) > 0
    # disjoint: the base step shows no future class, so all its objects are its own and labelled
    disjoint = generate(tmp_path / "disjoint", setting="disjoint", eval_batch=0)
    assert len(disjoint) == 3 and unlabelled_vivid(disjoint[0]) == 0
    assert unlabelled_vivid(disjoint[2]) > 0  # old classes appear in later steps, unlabelled


def test_generate_batches_refuses_bad_settings(tmp_path: Path, batches: list[Path]) -> None:
    with pytest.raises(
        DataError, match="synth-00-base already exists; remove it or choose another output folder"
    ):
        generate(batches[0].parent)
    with pytest.raises(ConfigError, match="needs 30 classes; the synthetic set has 24"):
        generate_batches(tmp_path, "20-10")
    with pytest.raises(ConfigError, match="setting: 'mixed' is not one of overlap, disjoint"):
        generate_batches(tmp_path, setting="mixed")
    with pytest.raises(ConfigError, match="train_per_step: 3 must be >= 4"):
        generate_batches(tmp_path, PROTOCOL, train_per_step=3)
    with pytest.raises(ConfigError, match="eval_batch: 5 must be 0 or >= 8"):
        generate_batches(tmp_path, PROTOCOL, eval_batch=5)
    with pytest.raises(ConfigError, match=r"objects: \(0, 3\) must be \(least, most\)"):
        generate_batches(tmp_path, PROTOCOL, objects=(0, 3))
    assert not list(tmp_path.iterdir())
