"""Check one split of a batch: its ``images/`` against its ``masks/``, then each image and mask read.

A split is the training part (``images/``, ``masks/``) or the optional held-out part (``val/images/``,
``val/masks/``). Its files are paired by stem; then, when the batch is within its limits, every image is
decoded for its size and every mask for its histogram of raw values, which gives the pixels of each class
and the values the manifest does not declare. The problems come in a fixed order: files that do not belong,
missing folders, unpaired files, then each image and each mask by name.
"""

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ciss_daemon.batch.listing import Listing
from ciss_daemon.batch.reading import Limits, Refused, image_size, mask_histogram, read_file
from engine.batch_format import (
    BACKGROUND,
    IGNORE,
    IMAGE_SUFFIXES,
    MASK_SUFFIX,
    ParsedManifest,
    Problem,
    join_values,
)


@dataclass
class Split:
    """What the images/ and masks/ of one split (train or val) hold."""

    stems: list[str] = field(default_factory=list)
    # (256,) pixels per raw mask value
    counts: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    problems: list[Problem] = field(default_factory=list)
    masks_complete: bool = True  # every mask was decoded, so `counts` is whole
    read_complete: bool = True  # every image and mask was read, so the hash is whole


def check_split(
    folder: Path,
    prefix: str,
    listing: Listing,
    manifest: ParsedManifest,
    limits: Limits,
    digests: dict[str, tuple[int, str]],
    read_contents: bool,
    *,
    required: bool,
) -> Split:
    """Check `<prefix>images/` against `<prefix>masks/`; the val split (prefix "val/") is optional.

    `digests` gains the hash of every file read; `read_contents` False (the batch is over its limits)
    stops after the pairing, before any file is opened.
    """
    split = Split()
    if not required and prefix.rstrip("/") not in listing.dirs:
        return split
    if listing.truncated:
        # A partial listing would make up missing masks and orphans; the size problem says enough.
        split.masks_complete = split.read_complete = False
        return split
    images_by_stem, masks_by_stem = _pair_files(listing, prefix, split.problems)
    split.stems = sorted(set(images_by_stem) & set(masks_by_stem))
    if not read_contents:
        split.masks_complete = split.read_complete = False
        return split
    sizes = _check_images(folder, images_by_stem, limits, digests, split)
    # (256,) True for the mask values the manifest allows; None when it declares no classes to compare with.
    allowed = None
    if manifest.classes is not None:
        allowed = np.zeros(256, dtype=bool)
        allowed[[BACKGROUND, IGNORE, *manifest.classes]] = True
    for stem, rel in sorted(masks_by_stem.items()):
        _check_mask(folder, rel, images_by_stem.get(stem), sizes.get(stem), allowed, limits, digests, split)
    return split


def _pair_files(
    listing: Listing, prefix: str, problems: list[Problem]
) -> tuple[dict[str, str], dict[str, str]]:
    """The split's images and masks by stem (relative paths), reporting missing folders and unpaired files."""
    images_dir, masks_dir = f"{prefix}images", f"{prefix}masks"
    images = _split_files(
        listing, images_dir, IMAGE_SUFFIXES, problems, "an image (.jpg, .jpeg or .png)", exact_suffix=False
    )
    masks = _split_files(listing, masks_dir, (MASK_SUFFIX,), problems, "a mask (.png)", exact_suffix=True)
    if images is None:
        problems.append(
            Problem(f"{images_dir}/", "is missing", "put the RGB images (.jpg, .jpeg or .png) in it")
        )
    elif not images:
        problems.append(
            Problem(f"{images_dir}/", "holds no images", "add the RGB images, or remove the folder")
        )
    if masks is None:
        problems.append(Problem(f"{masks_dir}/", "is missing", "put one PNG mask per image in it"))

    images_by_stem: dict[str, str] = {}
    for rel in images or []:
        stem = Path(rel).stem
        if stem in images_by_stem:
            problems.append(
                Problem(
                    rel,
                    f"has the same name as {images_by_stem[stem]} apart from its extension",
                    "keep one of them; each image needs its own name",
                )
            )
        else:
            images_by_stem[stem] = rel
    masks_by_stem = {Path(rel).stem: rel for rel in masks or []}
    if masks is not None:
        for stem, rel in images_by_stem.items():
            if stem not in masks_by_stem:
                problems.append(
                    Problem(rel, "has no mask", f"add {masks_dir}/{stem}{MASK_SUFFIX}, or remove the image")
                )
    if images is not None:
        for stem, rel in masks_by_stem.items():
            if stem not in images_by_stem:
                problems.append(
                    Problem(
                        rel,
                        f"has no image with the same name in {images_dir}/",
                        f"add {images_dir}/{stem}.jpg or .png, or remove the mask",
                    )
                )
    return images_by_stem, masks_by_stem


def _split_files(
    listing: Listing,
    directory: str,
    suffixes: tuple[str, ...],
    problems: list[Problem],
    expected: str,
    *,
    exact_suffix: bool,
) -> list[str] | None:
    """Relative paths of the files in `directory` ending in `suffixes`; None when the folder is missing.

    Any other file or folder inside it is reported; hidden files are skipped.
    """
    if directory not in listing.dirs:
        if directory in listing.files:
            problems.append(Problem(directory, "is a file, not a folder", f"make {directory}/ a folder"))
        return None
    prefix = directory + "/"
    found = []
    for rel in sorted(listing.files):
        if not rel.startswith(prefix) or "/" in rel[len(prefix) :]:
            continue
        name = rel[len(prefix) :]
        if name.startswith("."):
            continue  # hidden files (.DS_Store, ._* forks) are skipped, as the loader skips them
        if (name if exact_suffix else name.lower()).endswith(suffixes):
            found.append(rel)
        elif name.lower().endswith(suffixes):
            # The loader matches a mask's .png exactly, so ask for a rename.
            suffix = Path(name).suffix
            problems.append(
                Problem(rel, f"has an upper-case extension {suffix}", f"rename it to end in {suffix.lower()}")
            )
        elif directory.endswith("masks") and name.lower().endswith((".jpg", ".jpeg")):
            problems.append(
                Problem(rel, "is a JPEG mask", "save masks as PNG: JPEG compression changes the label values")
            )
        else:
            problems.append(Problem(rel, f"is not {expected}", f"remove it from {directory}/"))
    for rel in sorted(listing.dirs):
        if rel.startswith(prefix) and "/" not in rel[len(prefix) :]:
            problems.append(
                Problem(f"{rel}/", f"is a folder inside {directory}/", f"move its files up into {prefix}")
            )
    return found


def _check_images(
    folder: Path,
    images_by_stem: dict[str, str],
    limits: Limits,
    digests: dict[str, tuple[int, str]],
    split: Split,
) -> dict[str, tuple[int, int]]:
    """Decode every image, by stem; returns stem -> (width, height) of those that decoded."""
    sizes: dict[str, tuple[int, int]] = {}
    for stem, rel in sorted(images_by_stem.items()):
        try:
            sizes[stem] = image_size(read_file(folder, rel, digests), limits)
        except OSError as exc:
            split.read_complete = False
            split.problems.append(Problem(rel, f"cannot be read ({exc.strerror or exc})", "make it readable"))
        except Refused as refused:
            split.problems.append(Problem(rel, refused.what, refused.todo))
    return sizes


def _check_mask(
    folder: Path,
    rel: str,
    image_rel: str | None,
    expected_size: tuple[int, int] | None,
    allowed: np.ndarray | None,
    limits: Limits,
    digests: dict[str, tuple[int, str]],
    split: Split,
) -> None:
    """Decode the mask `rel`, add its pixels to the split's counts, and compare it with its image
    (`image_rel`, of `expected_size` when it decoded) and with the `allowed` values."""
    try:
        counts, size = mask_histogram(read_file(folder, rel, digests), limits)
    except OSError as exc:
        split.read_complete = split.masks_complete = False
        split.problems.append(Problem(rel, f"cannot be read ({exc.strerror or exc})", "make it readable"))
        return
    except Refused as refused:
        split.masks_complete = False
        split.problems.append(Problem(rel, refused.what, refused.todo))
        return
    split.counts += counts
    if expected_size is not None and expected_size != size:
        split.problems.append(
            Problem(
                rel,
                f"is {size[0]}x{size[1]} but {image_rel} is {expected_size[0]}x{expected_size[1]}",
                "resize the mask to its image",
            )
        )
    if allowed is None:
        return
    unknown = np.flatnonzero((counts > 0) & ~allowed)
    if unknown.size:
        split.problems.append(
            Problem(
                rel,
                f"contains {_values_phrase(unknown.tolist())} not declared in batch.toml [classes]",
                f"declare {'it' if unknown.size == 1 else 'them'} in [classes], or set those pixels to 0 "
                "(background) or 255 (ignore)",
            )
        )


def _values_phrase(values: list[int]) -> str:
    if len(values) == 1:
        return f"value {values[0]}"
    return f"values {join_values(values)}"
