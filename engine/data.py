"""Data for class-incremental segmentation: batch folders, label lookup tables, transforms, samplers.

A *batch folder* (docs/product.md) holds ``batch.toml``, ``images/<stem>.jpg|.png`` and ``masks/<stem>.png``
and optionally ``val/images`` and ``val/masks``. Its masks use batch-local values; a lookup table (LUT) of
256 entries turns a mask into global class ids in one indexing operation, and also applies the rule of
docs/method.md that, at step t, every label not in C_t becomes background (the ``keep`` set).

PASCAL VOC 2012 and ADE20K are read from their usual layouts; there the mask value *is* the global class
id, so their LUT is the identity restricted to a step's ``keep`` set.

Every random choice of augmentation comes from a ``torch.Generator`` seeded by :class:`StepSampler`, so
the sample seen at a given (epoch, position) is the same whatever the number of loader workers and after
a resume.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor
from torch.utils.data import Dataset, Sampler

from engine.batch_format import IGNORE, IMAGE_SUFFIXES, MANIFEST, SPLITS, BatchManifest, parse_manifest
from engine.config import SETTINGS
from engine.exceptions import ConfigError, DataError

IGNORE_INDEX = IGNORE
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ConfigError(f"split: {split!r} is not one of {', '.join(SPLITS)}")


def list_pairs(folder: Path, split: str = "train") -> list[tuple[Path, Path]]:
    """(image, mask) paths of one split of a batch folder, sorted by stem.

    ``split="train"`` reads ``images/`` and ``masks/``; ``"val"`` reads ``val/images`` and ``val/masks``
    and returns an empty list when the batch has no ``val/`` folder (it is optional). Hidden files are
    skipped; any other stray file, an image without its mask or a mask without its image is an error.
    """
    _check_split(split)
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
# Decoding and transforms
# --------------------------------------------------------------------------------------------------


def read_image(path: Path) -> Image.Image:
    """Decode an image file to RGB; :class:`DataError` naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"{path}: image file is missing; restore it or remove it from the list") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode the image ({exc}); replace or remove the file") from None


def read_mask(path: Path) -> Image.Image:
    """Decode a mask PNG keeping its raw values: mode 'L' (8-bit grey) or 'P' (palette indices)."""
    try:
        with Image.open(path) as mask:
            mask.load()
    except FileNotFoundError:
        raise DataError(f"{path}: mask file is missing; restore it or remove its image") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
        raise DataError(f"{path}: cannot decode the mask ({exc}); replace or remove the file") from None
    if mask.mode not in ("L", "P"):
        raise DataError(
            f"{path}: mask has mode {mask.mode}; save it as a single-channel 8-bit or palette PNG "
            "whose pixel values are the class values"
        )
    return mask


def normalize_image(image: Image.Image) -> Tensor:
    """RGB image -> (3, H, W) float32 with ImageNet mean/std normalisation."""
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy())  # (H, W, 3)
    pixels = array.permute(2, 0, 1).to(torch.float32).div_(255.0)  # (3, H, W)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return pixels.sub_(mean).div_(std)


def _mask_tensor(mask: Image.Image) -> Tensor:
    return torch.from_numpy(np.array(mask, dtype=np.uint8))  # (H, W) raw values


class Transform(Protocol):
    """What :class:`SegmentationFiles` calls: (image, mask, generator) -> ((3, H, W) float, (H, W) uint8)."""

    def __call__(
        self, image: Image.Image, mask: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]: ...


CROP_RATIO = (3 / 4, 4 / 3)  # aspect-ratio bounds of the training crop (width / height)
CROP_TRIES = 10


def random_crop_box(
    width: int, height: int, scale: tuple[float, float], generator: torch.Generator
) -> tuple[int, int, int, int]:
    """A training crop ``(left, top, crop_width, crop_height)``, as torchvision's RandomResizedCrop draws it.

    Up to ten tries of an area that is a uniform ``scale`` fraction of the image's and an aspect ratio
    log-uniform in :data:`CROP_RATIO`, kept when the box fits inside the image, at a uniform position;
    otherwise the whole image, centre-cropped to the nearest ratio bound. Never larger than the image,
    so nothing is padded. Random numbers come from ``generator`` only.
    """

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * torch.rand(1, generator=generator).item()

    area = width * height
    log_low, log_high = math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1])
    for _ in range(CROP_TRIES):
        target = area * uniform(*scale)
        aspect = math.exp(uniform(log_low, log_high))
        crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            top = int(torch.randint(0, height - crop_h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - crop_w + 1, (1,), generator=generator))
            return left, top, crop_w, crop_h
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        crop_w, crop_h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        crop_w, crop_h = round(height * CROP_RATIO[1]), height
    else:
        crop_w, crop_h = width, height
    return (width - crop_w) // 2, (height - crop_h) // 2, crop_w, crop_h


class TrainTransform:
    """docs/method.md augmentation: a random resized crop, a horizontal flip, ImageNet normalisation.

    The crop box is :func:`random_crop_box` with an area of ``scale_min``..``scale_max`` times the
    image's (0.5-2.0 in the reference), resized to ``crop_size`` x ``crop_size`` (bilinear for the
    image, nearest for the mask); then a flip with probability 0.5. No pixel is padding. Random draws
    come from ``generator`` only, so a sample is a pure function of its seed.
    """

    def __init__(self, crop_size: int, scale_min: float = 0.5, scale_max: float = 2.0) -> None:
        if crop_size < 1 or scale_min <= 0 or scale_max < scale_min:
            raise ConfigError(
                f"TrainTransform: crop_size {crop_size} must be >= 1 and 0 < scale_min ({scale_min}) "
                f"<= scale_max ({scale_max})"
            )
        self.crop_size = crop_size
        self.scale_min = scale_min
        self.scale_max = scale_max

    def __call__(
        self, image: Image.Image, mask: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        if generator is None:
            raise ValueError("TrainTransform needs a torch.Generator so that augmentation is reproducible")
        width, height = image.size
        left, top, crop_w, crop_h = random_crop_box(
            width, height, (self.scale_min, self.scale_max), generator
        )
        box = (left, top, left + crop_w, top + crop_h)
        size = (self.crop_size, self.crop_size)
        image = image.resize(size, Image.Resampling.BILINEAR, box=box)
        mask = mask.resize(size, Image.Resampling.NEAREST, box=box)
        pixels = normalize_image(image)  # (3, crop, crop)
        labels = _mask_tensor(mask)  # (crop, crop)
        if torch.rand(1, generator=generator).item() < 0.5:
            pixels, labels = pixels.flip(-1), labels.flip(-1)
        return pixels.contiguous(), labels.contiguous()


class EvalTransform:
    """No augmentation: ImageNet normalisation, and optionally a smaller size.

    ``max_size`` shrinks the image so that its longer side is at most that (the daemon's evaluation);
    ``crop`` resizes it so that the shorter side is ``crop`` and cuts the centred ``crop`` x ``crop``
    square (the reference's test transform, on which the published figures are measured). The mask is
    resized with nearest neighbour, so scores are computed at the reduced size.
    """

    def __init__(self, max_size: int | None = None, crop: int | None = None) -> None:
        for name, value in (("max_size", max_size), ("crop", crop)):
            if value is not None and value < 1:
                raise ConfigError(f"EvalTransform: {name} {value} must be >= 1 or None")
        self.max_size = max_size
        self.crop = crop

    def __call__(
        self, image: Image.Image, mask: Image.Image, generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        width, height = image.size
        factor = None
        if self.crop is not None:
            factor = self.crop / min(width, height)
        elif self.max_size is not None and max(width, height) > self.max_size:
            factor = self.max_size / max(width, height)
        if factor is not None and factor != 1:
            size = (max(1, round(width * factor)), max(1, round(height * factor)))
            image = image.resize(size, Image.Resampling.BILINEAR)
            mask = mask.resize(size, Image.Resampling.NEAREST)
        if self.crop is not None:
            width, height = image.size
            left, top = (width - self.crop) // 2, (height - self.crop) // 2
            box = (left, top, left + self.crop, top + self.crop)
            image, mask = image.crop(box), mask.crop(box)
        return normalize_image(image), _mask_tensor(mask)


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


# --------------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def sample_seeds(seed: int, epoch: int, positions: np.ndarray) -> list[int]:
    """Seeds (63-bit ints) of the samples at ``positions`` of the epoch's permutation.

    A splitmix64 hash of (seed, epoch, position), so neighbouring positions, epochs and seeds give
    unrelated augmentations. numpy uint64 arithmetic wraps modulo 2**64, which the hash relies on.
    """
    base = ((seed & _MASK64) * 0x9E3779B97F4A7C15 + (epoch & _MASK64) * 0xD1B54A32D192ED03) & _MASK64
    x = positions.astype(np.uint64) + np.uint64(base)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    x = x ^ (x >> np.uint64(31))
    return [int(v) for v in x >> np.uint64(1)]


class StepSampler(Sampler):
    """Deterministic, resumable, DDP-aware sampler yielding ``(index, sample_seed)`` pairs.

    Epoch e shuffles with ``torch.randperm(num_items)`` from a generator seeded ``seed + e``, pads the
    permutation to a multiple of ``world_size`` by repeating its head (like ``DistributedSampler``) and
    gives rank r the positions ``r::world_size``. Each rank then keeps a multiple of ``batch_size``
    samples so every batch is full, unless it has fewer than one batch, in which case it keeps them all.
    The sample seed depends on (seed, epoch, position in the padded permutation) only, so augmentation
    does not depend on the number of loader workers or on a resume.

    Usage, where ``batch_size`` is the per-rank batch size of the DataLoader::

        sampler = StepSampler(len(dataset), batch_size, seed=cfg.seed, rank=rank, world_size=world_size)
        loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers)
        for epoch in range(first_epoch, epochs):
            # resuming after `done` batches of this epoch: start=done * batch_size, else 0
            sampler.set_epoch(epoch, start=done * batch_size if epoch == first_epoch else 0)
            for images, labels in loader:  # (N, 3, H, W) float32, (N, H, W) int64
                ...
    """

    def __init__(
        self, num_items: int, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if num_items < 0 or batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"StepSampler: need num_items >= 0, batch_size >= 1 and 0 <= rank < world_size; got "
                f"{num_items}, {batch_size}, rank {rank}, world_size {world_size}"
            )
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.start = 0

    def _samples_per_rank(self) -> int:
        """Samples this rank yields in a whole epoch (full batches only, unless under one batch)."""
        per_rank = math.ceil(self.num_items / self.world_size)
        return per_rank if per_rank < self.batch_size else per_rank - per_rank % self.batch_size

    def batches_per_epoch(self) -> int:
        """Batches each rank gets in one epoch (all full but possibly one when under one batch)."""
        return math.ceil(self._samples_per_rank() / self.batch_size)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch, and skip the first ``start`` samples of this rank (resume mid-epoch)."""
        if not 0 <= start <= self._samples_per_rank():
            raise ValueError(f"StepSampler: start {start} is outside 0..{self._samples_per_rank()}")
        self.epoch = epoch
        self.start = start

    def __len__(self) -> int:
        return self._samples_per_rank() - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.num_items == 0:
            return iter(())
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_items, generator=generator).numpy()
        total = math.ceil(self.num_items / self.world_size) * self.world_size
        order = np.resize(order, total)  # repeats the head to pad, as DistributedSampler does
        positions = np.arange(self.rank, total, self.world_size)[self.start : self._samples_per_rank()]
        seeds = sample_seeds(self.seed, self.epoch, positions)
        return iter(zip(order[positions].tolist(), seeds, strict=True))


# --------------------------------------------------------------------------------------------------
# DKD-M exemplar memory and pseudo-labels
# --------------------------------------------------------------------------------------------------


def build_memory(
    candidates: Sequence[set[int]], old_classes: Sequence[int], size: int, generator: torch.Generator
) -> list[int]:
    """Indices of a class-balanced exemplar memory (DKD-M, docs/method.md).

    Round-robin over a random order of the old classes; each turn takes one not yet chosen candidate that
    contains the class (candidates visited in a random order), until ``size`` are chosen or none is left.
    """
    class_order = [old_classes[i] for i in torch.randperm(len(old_classes), generator=generator).tolist()]
    visit = torch.randperm(len(candidates), generator=generator).tolist()
    queues = {c: [i for i in visit if c in candidates[i]] for c in class_order}
    heads = dict.fromkeys(class_order, 0)
    chosen: list[int] = []
    taken: set[int] = set()
    progress = True
    while len(chosen) < size and progress:
        progress = False
        for c in class_order:
            queue = queues[c]
            while heads[c] < len(queue) and queue[heads[c]] in taken:
                heads[c] += 1
            if heads[c] < len(queue):
                taken.add(queue[heads[c]])
                chosen.append(queue[heads[c]])
                progress = True
                if len(chosen) == size:
                    break
    return chosen


def pseudo_label(label: Tensor, teacher_logits: Tensor, threshold: float = 0.9) -> Tensor:
    """Fill background with the teacher's confident classes (DKD-M candidate sets, docs/method.md).

    label: (H, W) or (N, H, W) int64. teacher_logits: (1 + K, H, W) or (N, 1 + K, H, W) at full
    resolution, channel 0 the auxiliary classifier. A background pixel (label 0) whose top sigmoid score
    over classes 1..K is >= ``threshold`` takes the teacher's argmax class; other pixels keep their label.
    """
    batched = label.dim() == 3
    labels = label if batched else label.unsqueeze(0)  # (N, H, W)
    logits = teacher_logits if batched else teacher_logits.unsqueeze(0)  # (N, 1 + K, H, W)
    if logits.dim() != 4 or logits.shape[0] != labels.shape[0] or logits.shape[2:] != labels.shape[1:]:
        raise ValueError(
            f"pseudo_label: logits {tuple(teacher_logits.shape)} do not fit labels {tuple(label.shape)}"
        )
    if logits.shape[1] < 2:
        return label.clone()
    scores, best = torch.sigmoid(logits[:, 1:].float()).max(dim=1)  # (N, H, W) each
    filled = torch.where((labels == 0) & (scores >= threshold), best + 1, labels)
    return filled if batched else filled.squeeze(0)


# --------------------------------------------------------------------------------------------------
# Standard benchmarks: PASCAL VOC 2012 and ADE20K
# --------------------------------------------------------------------------------------------------

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
    _check_split(split)
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
    _check_split(split)
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
