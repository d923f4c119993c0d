"""Decoding and transforms: image and mask files to tensors, the training augmentation, the evaluation resize.

An image decodes to RGB and is normalised with the ImageNet mean and standard deviation; a mask keeps its
raw 8-bit values (the dataset's lookup table turns them into class ids). :class:`TrainTransform` is the
augmentation of docs/method.md (random resized crop, horizontal flip) and draws every random number from
the ``torch.Generator`` it is given, so a sample is a pure function of its seed; :class:`EvalTransform`
only resizes and normalises.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from engine.exceptions import ConfigError, DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def mask_tensor(mask: Image.Image) -> Tensor:
    """A decoded mask as a (H, W) uint8 tensor of its raw values."""
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
        labels = mask_tensor(mask)  # (crop, crop)
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
        return normalize_image(image), mask_tensor(mask)
