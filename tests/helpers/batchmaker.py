"""Small batch folders in the inbox format, for tests: `make_batch(tmp_path)` gives a valid training batch.

Import it as `from batchmaker import make_batch` (pytest puts tests/ on sys.path).
"""

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(path: Path, size: tuple[int, int] = (16, 16), seed: int = 0) -> None:
    """An RGB noise image of `size` (width, height); the format follows the suffix."""
    width, height = size
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)


def mask_array(values: list[int], size: tuple[int, int] = (16, 16)) -> np.ndarray:
    """A (height, width) uint8 label map: bands of background then each value; one ignore pixel."""
    width, height = size
    bands = np.array([0, *values], dtype=np.uint8)
    rows = np.arange(height) * len(bands) // height  # band index of each row
    labels = np.repeat(bands[rows][:, None], width, axis=1)
    labels[0, 0] = 255
    return labels


def write_mask(path: Path, labels: np.ndarray, mode: str = "L") -> None:
    """Save `labels` (height, width) uint8 as a PNG in mode L, or P with a grey palette (raw indices kept)."""
    image = Image.fromarray(labels.astype(np.uint8), "L")
    if mode == "P":
        image = image.convert("P")
        image.putpalette([level for level in range(256) for _ in range(3)])
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def manifest_text(classes: Mapping[int | str, str], kind: str | None = None) -> str:
    """batch.toml text declaring `classes` (mask value -> name) and, when given, `kind`."""
    lines = [f'kind = "{kind}"', ""] if kind is not None else []
    lines.append("[classes]")
    lines += [f'"{value}" = "{name}"' for value, name in classes.items()]
    return "\n".join(lines) + "\n"


def make_batch(
    parent: Path,
    name: str = "bikes",
    *,
    classes: Mapping[int, str] | None = None,
    n_train: int = 2,
    n_val: int = 0,
    size: tuple[int, int] = (16, 16),
    kind: str | None = None,
    image_suffix: str = ".png",
    seed: int = 0,
) -> Path:
    """Write a valid batch folder `parent/name` whose every mask holds every declared class; return it."""
    classes = {1: "bicycle"} if classes is None else dict(classes)
    folder = parent / name
    labels = mask_array(sorted(classes), size)
    for split, count in (("", n_train), ("val/", n_val)):
        for index in range(count):
            stem = f"{index:04d}"
            write_image(folder / f"{split}images/{stem}{image_suffix}", size, seed=seed + index)
            write_mask(folder / f"{split}masks/{stem}.png", labels)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "batch.toml").write_text(manifest_text(classes, kind))
    return folder
