"""Tests of the data modules (engine.data, transforms, sampling, exemplar_memory, standard_datasets):
manifests, pairs, LUTs, transforms, dataset, samplers, memory, benchmarks."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from engine.data import (
    SegmentationFiles,
    batch_dataset,
    filter_indices,
    label_lut,
    label_sets,
    list_pairs,
    read_manifest,
    remap,
)
from engine.exceptions import ConfigError, DataError
from engine.exemplar_memory import build_memory, pseudo_label
from engine.sampling import StepSampler
from engine.standard_datasets import (
    ADE20K_CLASSES,
    PROTOCOLS,
    VOC_CLASSES,
    ade20k_pairs,
    protocol_dataset,
    protocol_steps,
    voc_pairs,
)
from engine.transforms import EvalTransform, TrainTransform, random_crop_box


def write_pair(
    image_path: Path, mask_path: Path, mask: np.ndarray, colour: tuple[int, int, int] = (10, 20, 30)
):
    """An RGB image filled with ``colour`` and a mode-L mask from ``mask`` (H, W) uint8."""
    image_path.parent.mkdir(parents=True, exist_ok=True)
    mask_path.parent.mkdir(parents=True, exist_ok=True)
    height, width = mask.shape
    Image.new("RGB", (width, height), colour).save(image_path)
    Image.fromarray(mask.astype(np.uint8)).save(mask_path)


def make_batch(folder: Path, masks: dict[str, np.ndarray], manifest: str = '[classes]\n1 = "a"\n') -> Path:
    for stem, mask in masks.items():
        write_pair(folder / "images" / f"{stem}.png", folder / "masks" / f"{stem}.png", mask)
    (folder / "batch.toml").write_text(manifest)
    return folder


# ---------------------------------------------------------------------------------------------- manifests


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[classes\n", "batch 'b': batch.toml is not valid TOML"),
        ('[classes]\n1 = "a"\n01 = "b"\n', "batch 'b': batch.toml: [classes] key \"01\" has leading zeros"),
    ],
)
def test_read_manifest_rejects_bad_manifests(tmp_path: Path, text: str, message: str) -> None:
    # The rules themselves are pinned in test_batch_format.py, for the engine and validation together.
    folder = tmp_path / "b"
    folder.mkdir()
    (folder / "batch.toml").write_text(text)
    with pytest.raises(DataError, match=re.escape(message)):
        read_manifest(folder)


def test_read_manifest_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        read_manifest(tmp_path)
    assert (
        str(info.value)
        == f"batch '{tmp_path.name}': batch.toml is missing; write it last, after images/ and masks/"
    )


# ---------------------------------------------------------------------------------------------- pairs


def test_list_pairs_sorted_by_stem_with_optional_val(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), np.uint8)
    folder = make_batch(tmp_path / "b", {"b": mask, "a": mask})
    write_pair(folder / "images" / "c.jpg", folder / "masks" / "c.png", mask)
    (folder / "images" / ".DS_Store").write_text("")
    pairs = list_pairs(folder)
    assert [(i.name, m.name) for i, m in pairs] == [
        ("a.png", "a.png"),
        ("b.png", "b.png"),
        ("c.jpg", "c.png"),
    ]
    assert list_pairs(folder, "val") == []
    write_pair(folder / "val" / "images" / "v.png", folder / "val" / "masks" / "v.png", mask)
    assert [i.name for i, _ in list_pairs(folder, "val")] == ["v.png"]


def test_list_pairs_reports_unmatched_and_stray_files(tmp_path: Path) -> None:
    mask = np.zeros((4, 4), np.uint8)
    folder = make_batch(tmp_path / "b", {"a": mask})
    Image.new("RGB", (4, 4)).save(folder / "images" / "x.png")
    with pytest.raises(
        DataError, match=re.escape("batch 'b': images/x.png has no mask masks/x.png; add the mask")
    ):
        list_pairs(folder)
    (folder / "images" / "x.png").unlink()
    Image.fromarray(mask).save(folder / "masks" / "y.png")
    with pytest.raises(DataError, match=re.escape("batch 'b': masks/y.png has no image images/y.jpg|.png")):
        list_pairs(folder)
    (folder / "masks" / "y.png").unlink()
    (folder / "images" / "notes.txt").write_text("hi")
    with pytest.raises(DataError, match=re.escape("batch 'b': images/notes.txt is not a .jpg or .png image")):
        list_pairs(folder)
    with pytest.raises(DataError, match=re.escape("batch 'c': images/ is missing")):
        list_pairs(tmp_path / "c")


# ---------------------------------------------------------------------------------------------- lookup tables


def test_label_lut_maps_values_and_applies_keep() -> None:
    lut = label_lut({1: 7, 2: 9, 3: 4})
    assert lut.shape == (256,) and lut.dtype == torch.int64
    assert lut[[0, 1, 2, 3, 4, 200, 255]].tolist() == [0, 7, 9, 4, 255, 255, 255]
    kept = label_lut({1: 7, 2: 9, 3: 4}, keep={9})
    assert kept[[0, 1, 2, 3, 4, 255]].tolist() == [0, 0, 9, 0, 255, 255]
    mask = torch.tensor([[0, 1], [2, 255]], dtype=torch.uint8)
    assert remap(mask, kept).tolist() == [[0, 0], [9, 255]]
    with pytest.raises(DataError, match="mask value 255 cannot be mapped"):
        label_lut({255: 1})


# ---------------------------------------------------------------------------------------------- transforms


def checker_pair(width: int, height: int) -> tuple[Image.Image, Image.Image]:
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    mask = Image.fromarray(rng.integers(0, 4, (height, width), dtype=np.uint8))
    return image, mask


def test_train_transform_is_a_function_of_the_seed() -> None:
    image, mask = checker_pair(40, 30)
    transform = TrainTransform(24)
    first = transform(image, mask, torch.Generator().manual_seed(5))
    again = transform(image, mask, torch.Generator().manual_seed(5))
    other = transform(image, mask, torch.Generator().manual_seed(6))
    assert first[0].shape == (3, 24, 24) and first[0].dtype == torch.float32
    assert first[1].shape == (24, 24) and first[1].dtype == torch.uint8
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[0], other[0])


def test_train_transform_never_pads() -> None:
    # A mask without ignore pixels keeps none after the crop, even for images smaller than the crop.
    for width, height in ((8, 6), (40, 30), (30, 90), (200, 50)):
        image, mask = checker_pair(width, height)
        for seed in range(20):
            pixels, labels = TrainTransform(16)(image, mask, torch.Generator().manual_seed(seed))
            assert pixels.shape == (3, 16, 16) and labels.shape == (16, 16)
            assert int((labels == 255).sum()) == 0


def test_random_crop_box_keeps_the_area_and_ratio_bounds() -> None:
    width, height = 120, 90
    areas, ratios, fallbacks = [], [], 0
    for seed in range(2000):
        left, top, w, h = random_crop_box(width, height, (0.5, 2.0), torch.Generator().manual_seed(seed))
        assert 0 <= left and left + w <= width and 0 <= top and top + h <= height
        if (w, h) == (width, height):  # ten failed tries: the whole image (its ratio 4/3 is in bounds)
            fallbacks += 1
            continue
        areas.append(w * h / (width * height))
        ratios.append(w / h)
    # Rounding to whole pixels moves the bounds by at most about one pixel per side.
    assert min(areas) >= 0.5 * 0.97 and max(areas) <= 1.0
    assert min(ratios) >= 0.75 * 0.97 and max(ratios) <= 4 / 3 * 1.03
    # Areas above the image's never fit: about half of the draws retry, so the whole range below 1 is used.
    assert min(areas) < 0.52 and max(areas) > 0.95 and 0 < fallbacks < 2000 * 0.2
    assert min(ratios) < 0.8 and max(ratios) > 1.28


def test_random_crop_box_falls_back_to_the_centre_at_a_ratio_bound() -> None:
    # A 400x50 strip: no crop of ratio <= 4/3 and area >= half the image fits, so the centre is taken.
    assert random_crop_box(400, 50, (0.5, 2.0), torch.Generator().manual_seed(0)) == (166, 0, 67, 50)


def test_eval_transform_crops_the_centre_of_the_short_side_resize() -> None:
    image, mask = checker_pair(60, 30)
    pixels, labels = EvalTransform(crop=20)(image, mask)
    assert pixels.shape == (3, 20, 20) and labels.shape == (20, 20)
    expected = np.array(mask.resize((40, 20), Image.Resampling.NEAREST))[:, 10:30]
    assert torch.equal(labels, torch.from_numpy(expected))


def test_eval_transform_shrinks_the_longer_side() -> None:
    image, mask = checker_pair(40, 20)
    pixels, labels = EvalTransform(max_size=20)(image, mask)
    assert pixels.shape == (3, 10, 20) and labels.shape == (10, 20)
    assert set(labels.unique().tolist()) <= {0, 1, 2, 3}
    pixels, labels = EvalTransform()(image, mask)
    assert pixels.shape == (3, 20, 40) and torch.equal(labels, torch.from_numpy(np.array(mask)))


# ---------------------------------------------------------------------------------------------- dataset


def test_segmentation_files_returns_global_ids(tmp_path: Path) -> None:
    mask = np.array([[0, 1], [2, 255]], np.uint8)
    first = make_batch(tmp_path / "one", {"a": mask})
    second = make_batch(tmp_path / "two", {"a": mask})
    dataset = batch_dataset([(first, {1: 1, 2: 2}), (second, {1: 3, 2: 4})], "train", EvalTransform())
    assert len(dataset) == 2
    image, label = dataset[1]
    assert image.shape == (3, 2, 2) and label.dtype == torch.int64
    assert label.tolist() == [[0, 3], [4, 255]]
    assert dataset[0][1].tolist() == [[0, 1], [2, 255]]
    kept = batch_dataset([(second, {1: 3, 2: 4})], "train", EvalTransform(), keep={4})
    assert kept[0][1].tolist() == [[0, 0], [4, 255]]
    train = batch_dataset([(first, {1: 1, 2: 2})], "train", TrainTransform(4))
    assert torch.equal(train[(0, 9)][0], train[(0, 9)][0]) and torch.equal(train[0][0], train[(0, 0)][0])


def test_segmentation_files_reports_bad_files(tmp_path: Path) -> None:
    folder = make_batch(tmp_path / "b", {"a": np.zeros((4, 4), np.uint8)})
    image_path, mask_path = folder / "images" / "a.png", folder / "masks" / "a.png"
    dataset = SegmentationFiles([(image_path, mask_path)], label_lut({1: 1}), EvalTransform())
    Image.new("RGB", (4, 4)).save(mask_path)
    with pytest.raises(
        DataError, match=re.escape(f"{mask_path}: mask has mode RGB; save it as a single-channel")
    ):
        dataset[0]
    Image.fromarray(np.zeros((5, 4), np.uint8)).save(mask_path)
    with pytest.raises(DataError, match=re.escape(f"{mask_path}: mask is 4x5 but image a.png is 4x4")):
        dataset[0]
    image_path.write_bytes(b"not a png")
    with pytest.raises(DataError, match=re.escape(f"{image_path}: cannot decode the image")):
        dataset[0]


def test_label_sets_and_filter_indices_overlap_vs_disjoint(tmp_path: Path) -> None:
    masks = {
        "0": np.array([[0, 1], [1, 255]]),  # old class only
        "1": np.array([[0, 2], [1, 0]]),  # new + old
        "2": np.array([[2, 3], [0, 0]]),  # new + future
        "3": np.array([[3, 3], [0, 0]]),  # future only
    }
    folder = make_batch(tmp_path / "b", masks)
    dataset = batch_dataset([(folder, {1: 1, 2: 2, 3: 3})], "train", EvalTransform())
    sets = label_sets(dataset)
    assert sets == [{1}, {1, 2}, {2, 3}, {3}]
    assert filter_indices(sets, [2], [3], "overlap") == [1, 2]
    assert filter_indices(sets, [2], [3], "disjoint") == [1]
    assert [p[0].stem for p in dataset.subset([1, 2]).pairs] == ["1", "2"]
    with pytest.raises(ConfigError, match="train.setting: 'mixed' is not one of overlap, disjoint"):
        filter_indices(sets, [2], [3], "mixed")


# ---------------------------------------------------------------------------------------------- sampler


def test_step_sampler_is_deterministic_and_resumable() -> None:
    sampler = StepSampler(10, 3, seed=4)
    sampler.set_epoch(2)
    epoch = list(sampler)
    assert len(epoch) == 9 == len(sampler) and sampler.batches_per_epoch() == 3  # drop_last: 10 -> 9
    again = StepSampler(10, 3, seed=4)
    again.set_epoch(2)
    assert list(again) == epoch
    indices = [i for i, _ in epoch]
    assert indices == torch.randperm(10, generator=torch.Generator().manual_seed(6)).tolist()[:9]
    assert len({s for _, s in epoch}) == 9  # every sample gets its own augmentation seed
    again.set_epoch(2, start=6)
    assert list(again) == epoch[6:] and len(again) == 3
    again.set_epoch(3)
    assert [i for i, _ in again] != indices
    assert not {s for _, s in again} & {s for _, s in epoch}  # a new epoch draws new augmentations


def test_step_sampler_ranks_partition_the_epoch() -> None:
    ranks = [StepSampler(12, 2, seed=1, rank=r, world_size=2) for r in range(2)]
    for sampler in ranks:
        sampler.set_epoch(0)
    parts = [list(s) for s in ranks]
    assert [len(p) for p in parts] == [6, 6]
    assert sorted(i for p in parts for i, _ in p) == list(range(12))
    # a sample's seed depends on its place in the epoch, not on how many ranks share it
    single = StepSampler(12, 2, seed=1)
    single.set_epoch(0)
    assert sorted(single) == sorted(parts[0] + parts[1])


def test_step_sampler_keeps_a_short_epoch_and_feeds_a_dataloader(tmp_path: Path) -> None:
    small = StepSampler(3, 8, seed=0)
    assert len(list(small)) == 3 and small.batches_per_epoch() == 1
    folder = make_batch(tmp_path / "b", {str(i): np.full((6, 6), i % 2, np.uint8) for i in range(5)})
    dataset = batch_dataset([(folder, {1: 1})], "train", TrainTransform(4))
    sampler = StepSampler(len(dataset), 2, seed=3)
    sampler.set_epoch(1)
    batches = list(DataLoader(dataset, batch_size=2, sampler=sampler))
    assert len(batches) == sampler.batches_per_epoch() == 2
    assert batches[0][0].shape == (2, 3, 4, 4) and batches[0][1].shape == (2, 4, 4)
    first_index, first_seed = next(iter(sampler))
    assert torch.equal(batches[0][0][0], dataset[(first_index, first_seed)][0])


# -------------------------------------------------------------------------------------- memory, pseudo-labels


def test_build_memory_is_balanced_over_old_classes() -> None:
    # class 1 is in many images, classes 2 and 3 in few: the memory must still take 2 of each
    candidates = [{1}] * 10 + [{2}, {2}, {2}, {3}, {3}, {1, 3}]
    memory = build_memory(candidates, [1, 2, 3], 6, torch.Generator().manual_seed(0))
    assert len(memory) == len(set(memory)) == 6
    per_class = {c: sum(c in candidates[i] for i in memory) for c in (1, 2, 3)}
    assert per_class[2] == 2 and per_class[3] >= 2 and per_class[1] >= 2
    everything = build_memory(candidates, [1, 2, 3], 100, torch.Generator().manual_seed(0))
    assert sorted(everything) == list(range(len(candidates)))
    assert memory == build_memory(candidates, [1, 2, 3], 6, torch.Generator().manual_seed(0))


def test_pseudo_label_fills_confident_background() -> None:
    label = torch.tensor([[0, 0], [2, 255]])
    logits = torch.full((3, 2, 2), -10.0)  # channels: aux, class 1, class 2
    logits[1, 0, 0] = 5.0  # confident class 1 on background: taken
    logits[2, 0, 1] = 0.5  # sigmoid 0.62 < 0.9: stays background
    logits[1, 1, 0] = 5.0  # labelled pixel: keeps its label
    logits[1, 1, 1] = 5.0  # ignore pixel: stays ignore
    assert pseudo_label(label, logits).tolist() == [[1, 0], [2, 255]]
    assert pseudo_label(label, logits, threshold=0.6).tolist() == [[1, 2], [2, 255]]
    batched = pseudo_label(label[None].repeat(2, 1, 1), logits[None].repeat(2, 1, 1, 1))
    assert batched.shape == (2, 2, 2) and batched[1].tolist() == [[1, 0], [2, 255]]


# ---------------------------------------------------------------------------------------------- benchmarks


@pytest.mark.parametrize(("dataset", "protocol"), [(d, p) for d in PROTOCOLS for p in PROTOCOLS[d]])
def test_protocol_steps_cover_the_dataset(dataset: str, protocol: str) -> None:
    steps = protocol_steps(dataset, protocol)
    assert [len(s) for s in steps] == PROTOCOLS[dataset][protocol]
    total = {"voc": 20, "ade": 150}[dataset]
    assert [c for s in steps for c in s] == list(range(1, total + 1))


def test_protocol_step_counts_and_errors() -> None:
    assert [len(protocol_steps("voc", p)) for p in ("19-1", "15-5", "15-1", "10-1", "5-3")] == [
        2,
        2,
        6,
        11,
        6,
    ]
    assert [len(protocol_steps("ade", p)) for p in ("100-50", "100-10", "50-50")] == [2, 6, 3]
    assert protocol_steps("voc", "15-1")[1:] == [[16], [17], [18], [19], [20]]
    with pytest.raises(
        ConfigError, match=re.escape("protocol: '15-2' is not one of 19-1, 15-5, 15-1, 10-1, 5-3")
    ):
        protocol_steps("voc", "15-2")
    with pytest.raises(ConfigError, match="dataset: 'coco' is not one of voc, ade"):
        protocol_steps("coco", "15-1")
    assert len(VOC_CLASSES) == 20 and VOC_CLASSES[14] == "person"
    assert len(ADE20K_CLASSES) == len(set(ADE20K_CLASSES)) == 150
    assert (ADE20K_CLASSES[0], ADE20K_CLASSES[12], ADE20K_CLASSES[149]) == ("wall", "person", "flag")


def make_voc(root: Path, masks: dict[str, np.ndarray]) -> None:
    for stem, mask in masks.items():
        write_pair(root / "JPEGImages" / f"{stem}.jpg", root / "SegmentationClassAug" / f"{stem}.png", mask)
    lists = root / "ImageSets" / "Segmentation"
    lists.mkdir(parents=True)
    (lists / "train_aug.txt").write_text("".join(f"{s}\n" for s in masks))


def test_voc_pairs_reads_both_list_formats(tmp_path: Path) -> None:
    make_voc(tmp_path, {"2007_000001": np.zeros((8, 8)), "2007_000002": np.ones((8, 8))})
    pairs = voc_pairs(tmp_path, "train")
    assert pairs == [
        (tmp_path / "JPEGImages" / f"{s}.jpg", tmp_path / "SegmentationClassAug" / f"{s}.png")
        for s in ("2007_000001", "2007_000002")
    ]
    # val: one id whose mask is only in SegmentationClass, one line in the two-column format
    write_pair(
        tmp_path / "JPEGImages" / "v1.jpg", tmp_path / "SegmentationClass" / "v1.png", np.zeros((8, 8))
    )
    val_list = tmp_path / "ImageSets" / "Segmentation" / "val.txt"
    val_list.write_text("v1\n/JPEGImages/2007_000001.jpg /SegmentationClassAug/2007_000001.png\n")
    assert voc_pairs(tmp_path, "val") == [
        (tmp_path / "JPEGImages" / "v1.jpg", tmp_path / "SegmentationClass" / "v1.png"),
        pairs[0],
    ]
    (tmp_path / "JPEGImages" / "2007_000002.jpg").unlink()
    with pytest.raises(
        DataError, match=re.escape(f"{tmp_path / 'JPEGImages' / '2007_000002.jpg'} (listed by")
    ):
        voc_pairs(tmp_path, "train")
    with pytest.raises(DataError, match="train_aug.txt is missing; download the PASCAL VOC 2012"):
        voc_pairs(tmp_path / "nowhere", "train")


def test_ade20k_pairs_reads_the_challenge_layout(tmp_path: Path) -> None:
    for split in ("training", "validation"):
        for stem in ("ADE_b", "ADE_a"):
            image = tmp_path / "images" / split / f"{stem}.jpg"
            write_pair(image, tmp_path / "annotations" / split / f"{stem}.png", np.zeros((8, 8)))
    pairs = ade20k_pairs(tmp_path, "val")
    assert [(i.relative_to(tmp_path), m.relative_to(tmp_path)) for i, m in pairs] == [
        (Path("images/validation/ADE_a.jpg"), Path("annotations/validation/ADE_a.png")),
        (Path("images/validation/ADE_b.jpg"), Path("annotations/validation/ADE_b.png")),
    ]
    (tmp_path / "annotations" / "training" / "ADE_a.png").unlink()
    with pytest.raises(DataError, match="ADE_a.png .listed by .* is missing, and 0 more files"):
        ade20k_pairs(tmp_path, "train")
    with pytest.raises(DataError, match="is missing; download ADEChallengeData2016.zip"):
        ade20k_pairs(tmp_path / "nowhere", "train")


def test_protocol_dataset_filters_and_masks_a_voc_step(tmp_path: Path) -> None:
    make_voc(
        tmp_path,
        {
            "a": np.array([[0, 3], [16, 0]]),  # old 3 + new 16
            "b": np.array([[0, 16], [18, 0]]),  # new 16 + future 18
            "c": np.array([[0, 3], [3, 0]]),  # old only
        },
    )
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("a\nb\nc\n")
    overlap = protocol_dataset("voc", tmp_path, "15-1", 1, "train", EvalTransform())
    assert [p[0].stem for p in overlap.pairs] == ["a", "b"]
    assert overlap[0][1].tolist() == [[0, 0], [16, 0]] and overlap[1][1].tolist() == [[0, 16], [0, 0]]
    disjoint = protocol_dataset("voc", tmp_path, "15-1", 1, "train", EvalTransform(), setting="disjoint")
    assert [p[0].stem for p in disjoint.pairs] == ["a"]
    val = protocol_dataset("voc", tmp_path, "15-1", 1, "val", EvalTransform())
    assert (
        len(val) == 3 and val[1][1].tolist() == [[0, 16], [0, 0]] and val[0][1].tolist() == [[0, 3], [16, 0]]
    )


def test_protocol_dataset_ignores_unseen_ade20k_classes_in_evaluation(tmp_path: Path) -> None:
    for split in ("training", "validation"):
        mask = np.array([[0, 3], [120, 140]])  # 3 is a base class of 100-10; 120 comes at step 2, 140 at 4
        write_pair(
            tmp_path / "images" / split / "ADE_a.jpg", tmp_path / "annotations" / split / "ADE_a.png", mask
        )
    val = protocol_dataset("ade", tmp_path, "100-10", 2, "val", EvalTransform())
    assert val[0][1].tolist() == [[0, 3], [120, 255]]  # VOC would make 140 background; ADE20K ignores it
    present = [{3, 120}]
    train = protocol_dataset("ade", tmp_path, "100-10", 2, "train", EvalTransform(), present=present)
    assert train[0][1].tolist() == [[0, 0], [120, 0]]
