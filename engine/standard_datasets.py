"""Standard benchmarks: PASCAL VOC 2012 and ADE20K, read from their usual layouts, and their
class-incremental protocols (15-1, 100-50, ...).

There the mask value *is* the global class id, so their lookup table is the identity restricted to a
step's ``keep`` set; :func:`protocol_dataset` gives one step of a protocol as a dataset.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from pathlib import Path

import torch
from torch import Tensor

from engine.data import IGNORE_INDEX, SegmentationFiles, check_split, filter_indices, identity_lut, label_sets
from engine.exceptions import ConfigError, DataError
from engine.transforms import Transform

PROTOCOLS: dict[str, dict[str, list[int]]] = {
    "voc": {
        "19-1": [19, 1],
        "15-5": [15, 5],
        "15-1": [15, 1, 1, 1, 1, 1],
        "10-1": [10] + [1] * 10,
        "5-3": [5, 3, 3, 3, 3, 3],
    },
    "ade": {
        "100-50": [100, 50],
        "100-10": [100] + [10] * 5,
        "50-50": [50, 50, 50],
    },
}

VOC_CLASSES: tuple[str, ...] = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip

ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)  # fmt: skip

DATASET_CLASSES: dict[str, tuple[str, ...]] = {"voc": VOC_CLASSES, "ade": ADE20K_CLASSES}


def protocol_steps(dataset: str, protocol: str) -> list[list[int]]:
    """Global class ids of each step, in dataset order: voc 15-1 -> [[1..15], [16], ..., [20]]."""
    if dataset not in PROTOCOLS:
        raise ConfigError(f"dataset: {dataset!r} is not one of {', '.join(PROTOCOLS)}")
    if protocol not in PROTOCOLS[dataset]:
        raise ConfigError(
            f"protocol: {protocol!r} is not one of {', '.join(PROTOCOLS[dataset])} for {dataset}"
        )
    steps, first = [], 1
    for count in PROTOCOLS[dataset][protocol]:
        steps.append(list(range(first, first + count)))
        first += count
    return steps


def _resolve(root: Path, entry: str) -> Path:
    """A path from a list file: relative to ``root`` even when written with a leading slash."""
    return root / entry.lstrip("/")


def voc_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """PASCAL VOC 2012 (image, mask) pairs with the SBD-augmented masks, in list-file order.

    ``root`` is ``VOCdevkit/VOC2012``: ``JPEGImages/<id>.jpg``, ``SegmentationClassAug/<id>.png`` (val
    masks may instead be in ``SegmentationClass/``) and ``ImageSets/Segmentation/train_aug.txt`` (train)
    or ``val.txt``. List lines are ids, or the two-column ``/JPEGImages/x.jpg /SegmentationClassAug/x.png``
    format.
    """
    check_split(split)
    root = Path(root)
    list_file = root / "ImageSets" / "Segmentation" / ("train_aug.txt" if split == "train" else "val.txt")
    if not list_file.is_file():
        raise DataError(
            f"{list_file} is missing; download the PASCAL VOC 2012 trainval archive and the "
            "SegmentationClassAug masks with train_aug.txt, and unpack them under VOCdevkit/VOC2012"
        )
    pairs = []
    for line in list_file.read_text().splitlines():
        fields = line.split()
        if not fields:
            continue
        if len(fields) == 2:
            image, mask = _resolve(root, fields[0]), _resolve(root, fields[1])
        else:
            image = root / "JPEGImages" / f"{fields[0]}.jpg"
            mask = root / "SegmentationClassAug" / f"{fields[0]}.png"
            if split == "val" and not mask.is_file():
                mask = root / "SegmentationClass" / f"{fields[0]}.png"
        pairs.append((image, mask))
    _check_files(pairs, list_file, "download the VOC 2012 JPEGImages and the SegmentationClassAug masks")
    return pairs


def ade20k_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """ADE20K SceneParsing pairs from ``ADEChallengeData2016`` (``root``), sorted by name.

    ``images/{training,validation}/<name>.jpg`` and ``annotations/{training,validation}/<name>.png``;
    annotation value 0 is "other" (background) and k is class k of :data:`ADE20K_CLASSES`.
    """
    check_split(split)
    root = Path(root)
    folder = "training" if split == "train" else "validation"
    image_dir = root / "images" / folder
    if not image_dir.is_dir():
        raise DataError(
            f"{image_dir} is missing; download ADEChallengeData2016.zip (SceneParsing) and unpack it "
            f"so that {root} holds images/ and annotations/"
        )
    pairs = [(p, root / "annotations" / folder / f"{p.stem}.png") for p in sorted(image_dir.glob("*.jpg"))]
    if not pairs:
        raise DataError(f"{image_dir} holds no .jpg images; unpack ADEChallengeData2016.zip again")
    _check_files(pairs, image_dir, "unpack the annotations/ folder of ADEChallengeData2016.zip")
    return pairs


def _check_files(pairs: Sequence[tuple[Path, Path]], source: Path, remedy: str) -> None:
    missing = [path for pair in pairs for path in pair if not path.is_file()]
    if missing:
        raise DataError(
            f"{missing[0]} (listed by {source}) is missing, and {len(missing) - 1} more files; {remedy}"
        )


def dataset_pairs(dataset: str, root: Path, split: str) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of a standard dataset: ``"voc"`` or ``"ade"``."""
    if dataset == "voc":
        return voc_pairs(root, split)
    if dataset == "ade":
        return ade20k_pairs(root, split)
    raise ConfigError(f"dataset: {dataset!r} is not one of {', '.join(PROTOCOLS)}")


def protocol_dataset(
    dataset: str,
    root: Path,
    protocol: str,
    step: int,
    split: str,
    transform: Transform,
    *,
    setting: str = "overlap",
    present: Sequence[set[int]] | None = None,
) -> SegmentationFiles:
    """Step ``step`` of a standard protocol as a dataset of global class ids.

    Train split: the images :func:`filter_indices` keeps for the setting, labelled with the step's
    classes only (others become background). Val split: every image, labelled with the classes seen up
    to this step; classes not yet seen become background (VOC) or ignore (ADE20K), as the reference
    evaluates (docs/method.md). ``present`` (the label sets of every training image, in list order) saves
    reading every mask again.
    """
    steps = protocol_steps(dataset, protocol)
    if not 0 <= step < len(steps):
        raise ConfigError(f"step: {step} is outside 0..{len(steps) - 1} for {dataset} {protocol}")
    num_classes = len(DATASET_CLASSES[dataset])
    pairs = dataset_pairs(dataset, root, split)
    if split == "val":
        seen = [c for s in steps[: step + 1] for c in s]
        return SegmentationFiles(pairs, seen_lut(dataset, seen), transform)
    future = [c for s in steps[step + 1 :] for c in s]
    if present is None:
        present = label_sets(SegmentationFiles(pairs, identity_lut(num_classes), transform))
    kept = filter_indices(present, steps[step], future, setting)
    return SegmentationFiles([pairs[i] for i in kept], identity_lut(num_classes, steps[step]), transform)


def seen_lut(dataset: str, seen: Collection[int]) -> Tensor:
    """The evaluation LUT of a standard dataset after the classes ``seen``: unseen classes become
    background on VOC and ignore (255) on ADE20K, as the reference does."""
    lut = identity_lut(len(DATASET_CLASSES[dataset]), seen)
    if dataset == "ade":
        unseen = ~torch.isin(torch.arange(256), torch.tensor([0, *seen]))
        lut[unseen] = IGNORE_INDEX
    return lut
