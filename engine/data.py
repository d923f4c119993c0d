"""Data for class-incremental segmentation: batch folders, label lookup tables, the dataset, the step filters.

A *batch folder* (docs/product.md) holds ``batch.toml``, ``images/<stem>.jpg|.png`` and ``masks/<stem>.png``
and optionally ``val/images`` and ``val/masks``. Its masks use batch-local values; a lookup table (LUT) of
256 entries turns a mask into global class ids in one indexing operation, and also applies the rule of
docs/method.md that, at step t, every label not in C_t becomes background (the ``keep`` set).
:class:`SegmentationFiles` is the dataset over such files; decoding and augmentation live in
``engine.transforms``, the sampler in ``engine.sampling``, the VOC and ADE20K loaders in
``engine.standard_datasets``.
"""

from __future__ import annotations

import tomllib
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from engine.batch_format import IGNORE, IMAGE_SUFFIXES, MANIFEST, SPLITS, BatchManifest, parse_manifest
from engine.config import SETTINGS
from engine.exceptions import ConfigError, DataError
from engine.transforms import Transform, read_image, read_mask

IGNORE_INDEX = IGNORE


# --------------------------------------------------------------------------------------------------
# Batch folders
# --------------------------------------------------------------------------------------------------


def read_manifest(folder: Path) -> BatchManifest:
    """Read and check ``folder/batch.toml`` by the rules of ``engine/batch_format.py`` (the daemon's too);
    :class:`DataError` names the first problem and how to fix it."""
    folder = Path(folder)
    where = f"batch '{folder.name}': {MANIFEST}"
    try:
        with (folder / MANIFEST).open("rb") as stream:
            document = tomllib.load(stream)
    except FileNotFoundError:
        raise DataError(f"{where} is missing; write it last, after images/ and masks/") from None
    except tomllib.TOMLDecodeError as exc:
        raise DataError(f"{where} is not valid TOML ({exc}); fix the syntax") from None
    except OSError as exc:
        raise DataError(f"{where} cannot be read ({exc.strerror}); check its permissions") from None
    parsed = parse_manifest(document)
    if parsed.problems or parsed.classes is None:
        raise DataError(f"batch '{folder.name}': {parsed.problems[0]}")
    return BatchManifest(name=folder.name, kind=parsed.kind, classes=dict(sorted(parsed.classes.items())))


def check_split(split: str) -> None:
    """:class:`ConfigError` unless ``split`` is "train" or "val"."""
    if split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not one of {', '.join(SPLITS)}")


def list_pairs(folder: Path, split: str = "train") -> list[tuple[Path, Path]]:
    """(image, mask) paths of one split of a batch folder, sorted by stem.

    ``split="train"`` reads ``images/`` and ``masks/``; ``"val"`` reads ``val/images`` and ``val/masks``
    and returns an empty list when the batch has no ``val/`` folder (it is optional). Hidden files are
    skipped; any other stray file, an image without its mask or a mask without its image is an error.
    """
    check_split(split)
    folder = Path(folder)
    base = folder if split == "train" else folder / "val"
    prefix = "" if split == "train" else "val/"
    where = f"batch '{folder.name}'"
    image_dir, mask_dir = base / "images", base / "masks"
    if split == "val" and not base.exists():
        return []
    if not image_dir.is_dir():
        raise DataError(f"{where}: {prefix}images/ is missing; put the RGB images there")
    if not mask_dir.is_dir():
        raise DataError(f"{where}: {prefix}masks/ is missing; put one <stem>.png mask per image there")

    images: dict[str, Path] = {}
    for path in sorted(image_dir.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file() or path.suffix.lower() not in IMAGE_SUFFIXES:
            raise DataError(f"{where}: {prefix}images/{path.name} is not a .jpg or .png image; remove it")
        if path.stem in images:
            raise DataError(
                f"{where}: {prefix}images/{images[path.stem].name} and {path.name} share the stem "
                f"'{path.stem}'; keep one"
            )
        images[path.stem] = path
    masks: dict[str, Path] = {}
    for path in sorted(mask_dir.iterdir()):
        if path.name.startswith("."):
            continue
        if not path.is_file() or path.suffix != ".png":
            raise DataError(f"{where}: {prefix}masks/{path.name} is not a .png mask; remove it")
        masks[path.stem] = path

    for stem, path in images.items():
        if stem not in masks:
            raise DataError(
                f"{where}: {prefix}images/{path.name} has no mask {prefix}masks/{stem}.png; "
                "add the mask or remove the image"
            )
    for stem in masks:
        if stem not in images:
            raise DataError(
                f"{where}: {prefix}masks/{stem}.png has no image {prefix}images/{stem}.jpg|.png; "
                "add the image or remove the mask"
            )
    return [(images[stem], masks[stem]) for stem in sorted(images)]


# --------------------------------------------------------------------------------------------------
# Label lookup tables
# --------------------------------------------------------------------------------------------------


def label_lut(value_to_class: Mapping[int, int], keep: Collection[int] | None = None) -> Tensor:
    """A (256,) int64 table turning raw mask values into global class ids.

    0 stays background and 255 stays ignore; values not in ``value_to_class`` become ignore (255), so an
    undeclared value never trains as background. With ``keep``, classes outside it become background
    (docs/method.md: at step t every label not in C_t becomes 0).
    """
    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
    lut[0] = 0
    for value, class_id in value_to_class.items():
        if not 1 <= value <= 254:
            raise DataError(f"mask value {value} cannot be mapped to a class; use values 1-254")
        if class_id < 0 or class_id == IGNORE_INDEX:
            raise DataError(f"mask value {value} maps to class id {class_id}; class ids are >= 0 and not 255")
        lut[value] = class_id
    if keep is not None:
        dropped = ~torch.isin(lut, torch.tensor(sorted(keep), dtype=torch.int64)) & (lut != IGNORE_INDEX)
        lut[dropped] = 0
    return lut


def identity_lut(num_classes: int, keep: Collection[int] | None = None) -> Tensor:
    """The LUT of datasets whose mask value k is class k (PASCAL VOC, ADE20K), restricted to ``keep``."""
    return label_lut({k: k for k in range(1, num_classes + 1)}, keep)


def remap(mask: Tensor, lut: Tensor) -> Tensor:
    """Global class ids of a raw mask of any shape: ``lut[mask]`` (int64, same shape)."""
    return lut[mask.long()]


# --------------------------------------------------------------------------------------------------
# Dataset
# --------------------------------------------------------------------------------------------------


class SegmentationFiles(Dataset):
    """(image, mask) files, each with the LUT that maps its raw mask values to global class ids.

    ``luts`` is one (256,) tensor shared by every item, or one per item (items of one batch folder share
    the same tensor object, so this costs nothing). An item is an int or an ``(index, seed)`` pair as
    yielded by :class:`StepSampler`; the seed drives the transform (an int item uses seed 0).
    ``dataset[i]`` returns ``(image (3, H, W) float32, label (H, W) int64 global ids)``.
    """

    def __init__(
        self, pairs: Sequence[tuple[Path, Path]], luts: Tensor | Sequence[Tensor], transform: Transform
    ) -> None:
        self.pairs = [(Path(image), Path(mask)) for image, mask in pairs]
        if isinstance(luts, Tensor):
            luts = [luts] * len(self.pairs)
        self.luts = list(luts)
        if len(self.luts) != len(self.pairs):
            raise ValueError(f"{len(self.pairs)} image pairs but {len(self.luts)} lookup tables")
        if any(lut.shape != (256,) for lut in self.luts):
            raise ValueError("every lookup table must have shape (256,)")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[Tensor, Tensor]:
        index, seed = item if isinstance(item, tuple) else (item, 0)
        image_path, mask_path = self.pairs[index]
        image, mask = read_image(image_path), read_mask(mask_path)
        if image.size != mask.size:
            raise DataError(
                f"{mask_path}: mask is {mask.size[0]}x{mask.size[1]} but image {image_path.name} is "
                f"{image.size[0]}x{image.size[1]}; masks must have the size of their image"
            )
        generator = torch.Generator().manual_seed(int(seed))
        pixels, raw = self.transform(image, mask, generator)
        return pixels, remap(raw, self.luts[index])

    def subset(self, indices: Sequence[int]) -> SegmentationFiles:
        """The items at ``indices`` (e.g. from :func:`filter_indices`), with their own LUTs."""
        return SegmentationFiles(
            [self.pairs[i] for i in indices], [self.luts[i] for i in indices], self.transform
        )

    def global_labels(self, index: int) -> np.ndarray:
        """Global class ids of item ``index`` at full size without augmentation: (H, W) int64."""
        lut = self.luts[index].numpy()
        return lut[np.asarray(read_mask(self.pairs[index][1]), dtype=np.uint8)]


def batch_dataset(
    folders: Sequence[tuple[Path, Mapping[int, int]]],
    split: str,
    transform: Transform,
    keep: Collection[int] | None = None,
) -> SegmentationFiles:
    """One dataset over several batch folders, each given with its mask value -> global class id map."""
    pairs: list[tuple[Path, Path]] = []
    luts: list[Tensor] = []
    for folder, value_to_class in folders:
        folder_pairs = list_pairs(Path(folder), split)
        lut = label_lut(value_to_class, keep)
        pairs += folder_pairs
        luts += [lut] * len(folder_pairs)
    return SegmentationFiles(pairs, luts, transform)


def label_sets(dataset: SegmentationFiles) -> list[set[int]]:
    """Global class ids (>= 1, ignore excluded) present in each item; reads the masks only.

    Build the dataset with ``keep=None`` when the sets feed :func:`filter_indices`, so that old and
    future classes are still visible.
    """
    sets = []
    for index in range(len(dataset)):
        present = np.unique(dataset.global_labels(index))
        sets.append({int(c) for c in present if c not in (0, IGNORE_INDEX)})
    return sets


def filter_indices(
    label_sets: Sequence[set[int]],
    new_classes: Collection[int],
    future_classes: Collection[int],
    setting: str,
) -> list[int]:
    """Items a step trains on (docs/method.md): those with a pixel of a new class; in the disjoint setting
    also without any pixel of a future class."""
    if setting not in SETTINGS:
        raise ConfigError(f"train.setting: {setting!r} is not one of {', '.join(SETTINGS)}")
    new, future = set(new_classes), set(future_classes)
    return [
        i
        for i, present in enumerate(label_sets)
        if present & new and not (setting == "disjoint" and present & future)
    ]
