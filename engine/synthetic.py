"""A deterministic synthetic segmentation dataset in the batch folder format (demo, tests, benchmarks).

Each class is a coloured, textured shape ("red-disc", "striped-blue-disc", ...). An image shows several
objects, which may overlap (the later one wins in the mask), on a cluttered background of noise and
low-contrast blobs and lines in desaturated colours that belong to no class. Everything is drawn with
numpy on coordinate grids from a seeded ``numpy.random.Generator``, so the same seed writes the same bytes.

:func:`generate_batches` writes one batch folder per step of a protocol such as ``"10-2-2-2-2"``. Like real
incremental data, each batch labels only its own classes (other objects in its images are background in its
masks) and uses its own mask values 1..n, so the daemon has to remap them to global ids.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engine.config import SETTINGS
from engine.exceptions import ConfigError, DataError


@dataclass(frozen=True)
class SynthClass:
    """How one synthetic class looks."""

    name: str
    shape: str
    colour: str
    texture: str


_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 210, 40),
    "magenta": (210, 50, 200),
    "cyan": (40, 200, 215),
    "orange": (245, 135, 25),
    "white": (245, 245, 245),
}

# The least and most objects an image shows, the required one among them (render_sample's default).
OBJECTS = (2, 5)

# Desaturated mid tones: backgrounds and clutter never take a class colour.
_BACKGROUNDS = np.array(
    [(118, 118, 112), (96, 100, 104), (140, 132, 118), (104, 112, 98), (128, 120, 132), (84, 84, 88)],
    dtype=np.float32,
)

_TEXTURE_PREFIX = {
    "solid": "",
    "stripes": "striped-",
    "dots": "dotted-",
    "checker": "checker-",
    "gradient": "gradient-",
}

# Each (shape, colour) pair is used once, so two classes never differ by texture alone. Textures are spread
# over the list so that the first classes (the base step of most protocols) are varied.
_LOOKS = [
    ("disc", "red", "solid"),
    ("square", "green", "solid"),
    ("triangle", "blue", "solid"),
    ("ring", "yellow", "solid"),
    ("disc", "blue", "stripes"),
    ("square", "cyan", "dots"),
    ("cross", "magenta", "solid"),
    ("diamond", "green", "checker"),
    ("ellipse", "cyan", "gradient"),
    ("hexagon", "white", "solid"),
    ("star", "cyan", "solid"),
    ("bar", "yellow", "stripes"),
    ("diamond", "orange", "solid"),
    ("triangle", "white", "dots"),
    ("square", "blue", "checker"),
    ("cross", "red", "gradient"),
    ("ellipse", "green", "stripes"),
    ("disc", "magenta", "dots"),
    ("hexagon", "orange", "checker"),
    ("star", "yellow", "gradient"),
    ("square", "orange", "stripes"),
    ("hexagon", "red", "dots"),
    ("bar", "white", "checker"),
    ("triangle", "magenta", "gradient"),
]

CLASSES: tuple[SynthClass, ...] = tuple(
    SynthClass(f"{_TEXTURE_PREFIX[texture]}{colour}-{shape}", shape, colour, texture)
    for shape, colour, texture in _LOOKS
)
SYNTH_CLASSES: list[str] = [c.name for c in CLASSES]  # synthetic class id k is SYNTH_CLASSES[k - 1]


def _pretraining_looks(count: int = 32) -> tuple[SynthClass, ...]:
    """Looks for pre-training a backbone: the same shapes, colours and textures as :data:`CLASSES`, in
    combinations no protocol class uses.

    A (shape, colour) pair of a protocol class is never reused, so no pre-training class differs from a
    protocol class by texture alone: the features learned are generic (shape, colour, texture), the way
    ImageNet features are for PASCAL VOC, but no protocol class is seen before its step. The choice is a
    fixed round-robin over shapes, colours and textures, so every primitive appears.
    """
    used = {(c.shape, c.colour) for c in CLASSES}
    shapes = sorted({c.shape for c in CLASSES})
    colours = list(_COLOURS)
    textures = list(_TEXTURE_PREFIX)
    looks: list[SynthClass] = []
    for i in range(len(shapes) * len(colours)):
        shape, colour = shapes[i % len(shapes)], colours[(i // len(shapes) + i) % len(colours)]
        if (shape, colour) in used or any((c.shape, c.colour) == (shape, colour) for c in looks):
            continue
        texture = textures[len(looks) % len(textures)]
        looks.append(SynthClass(f"{_TEXTURE_PREFIX[texture]}{colour}-{shape}", shape, colour, texture))
        if len(looks) == count:
            break
    return tuple(looks)


PRETRAINING_CLASSES: tuple[SynthClass, ...] = _pretraining_looks()


# --------------------------------------------------------------------------------------------------
# Shapes: (u, v, r) -> inside mask, in the object's own frame (u right, v down, centred, rotated)
# --------------------------------------------------------------------------------------------------


def _polygon(u: np.ndarray, v: np.ndarray, r: float, sides: int, phase: float) -> np.ndarray:
    """Regular polygon of circumradius r: inside every half-plane of its edge normals."""
    normals = phase + 2 * np.pi * np.arange(sides) / sides  # (sides,)
    reach = u[None] * np.cos(normals)[:, None, None] + v[None] * np.sin(normals)[:, None, None]
    return reach.max(axis=0) <= r * np.cos(np.pi / sides)


def _star(u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    # Radius that swings between 0.42 r (between points) and r (at the 5 points) with the angle.
    turn = (np.arctan2(v, u) * 5 / (2 * np.pi) + 0.25) % 1.0
    return np.hypot(u, v) <= r * (0.42 + 0.58 * np.abs(2 * turn - 1))


_SHAPES: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "disc": lambda u, v, r: np.hypot(u, v) <= r,
    "ring": lambda u, v, r: (np.hypot(u, v) <= r) & (np.hypot(u, v) >= 0.55 * r),
    "square": lambda u, v, r: np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r,
    "triangle": lambda u, v, r: _polygon(u, v, r, 3, np.pi / 2),
    "hexagon": lambda u, v, r: _polygon(u, v, r, 6, 0.0),
    "diamond": lambda u, v, r: np.abs(u) / (0.65 * r) + np.abs(v) / r <= 1.0,
    "ellipse": lambda u, v, r: (u / r) ** 2 + (v / (0.5 * r)) ** 2 <= 1.0,
    "bar": lambda u, v, r: (np.abs(u) <= r) & (np.abs(v) <= 0.3 * r),
    "cross": lambda u, v, r: (
        (np.maximum(np.abs(u), np.abs(v)) <= r) & (np.minimum(np.abs(u), np.abs(v)) <= 0.3 * r)
    ),
    "star": _star,
}


def _texture(texture: str, u: np.ndarray, v: np.ndarray, r: float, unit: float) -> np.ndarray:
    """Brightness factor (H, W) that draws the texture; ``unit`` is the pattern scale in pixels."""
    if texture == "solid":
        return np.ones_like(u)
    if texture == "stripes":
        dark = np.floor(u / unit) % 2 == 1
    elif texture == "dots":
        cell = 2.5 * unit
        dark = (u % cell - cell / 2) ** 2 + (v % cell - cell / 2) ** 2 <= (0.3 * cell) ** 2
    elif texture == "checker":
        dark = (np.floor(u / (1.5 * unit)) + np.floor(v / (1.5 * unit))) % 2 == 1
    else:  # gradient: dark on one side, full colour on the other
        return 0.3 + 0.7 * np.clip((u + r) / (2 * r), 0.0, 1.0)
    return np.where(dark, 0.35, 1.0)


def _background(rng: np.random.Generator, grid: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Cluttered background (H, W, 3) float: tone, gradient, low-contrast blobs and lines."""
    yy, xx = grid
    size = yy.shape[0]
    base = _BACKGROUNDS[rng.integers(len(_BACKGROUNDS))] + rng.normal(0, 6, 3)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * xx + np.sin(angle) * yy) / size - 0.5  # (H, W) in about [-0.7, 0.7]
    image = base + rng.uniform(10, 30) * ramp[..., None]
    for _ in range(rng.integers(2, 6)):  # blobs: ellipses a little lighter or darker than the base
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = rng.uniform(0.05, 0.25, 2) * size
        blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        image[blob] = base + rng.normal(0, 14) + rng.normal(0, 4, 3)
    for _ in range(rng.integers(1, 4)):  # thin lines
        angle, offset = rng.uniform(0, np.pi), rng.uniform(0, size)
        line = np.abs(np.cos(angle) * xx + np.sin(angle) * yy - offset) <= rng.uniform(0.4, 1.0)
        image[line] = base + rng.normal(0, 18) + rng.normal(0, 4, 3)
    return image


def render_sample(
    rng: np.random.Generator,
    size: int,
    required: int,
    extras: Sequence[int],
    *,
    objects: tuple[int, int] = OBJECTS,
    looks: Sequence[SynthClass] = CLASSES,
) -> tuple[np.ndarray, np.ndarray]:
    """Draw one image: a cluttered background, ``objects[0] - 1`` to ``objects[1] - 1`` objects of classes
    drawn from ``extras`` (anywhere, possibly cut by the border, overlapping) and finally one object of class
    ``required`` fully inside the frame and on top, so it is always visible.

    Class ids are 1-based indices into ``looks`` (default :data:`CLASSES`: the ids of
    :data:`SYNTH_CLASSES`). Returns
    ``image (size, size, 3) uint8`` and ``labels (size, size) uint8`` with the class of the topmost
    object at each pixel and 0 for background.
    """
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5  # pixel centres, (H, W) each
    image = _background(rng, (yy, xx))  # (H, W, 3)
    labels = np.zeros((size, size), dtype=np.uint8)
    pool = list(extras) or [required]
    count = int(rng.integers(objects[0], objects[1] + 1))  # the required object among them
    drawn = [int(c) for c in rng.choice(pool, size=count - 1)] + [required]
    unit = max(2.0, size / 32)
    for index, class_id in enumerate(drawn):
        look = looks[class_id - 1]
        r = rng.uniform(0.10, 0.22) * size
        on_top = index == len(drawn) - 1
        cy, cx = rng.uniform(r, size - r, 2) if on_top else rng.uniform(0, size, 2)
        angle = rng.uniform(-0.4, 0.4)
        u = np.cos(angle) * (xx - cx) + np.sin(angle) * (yy - cy)
        v = -np.sin(angle) * (xx - cx) + np.cos(angle) * (yy - cy)
        inside = _SHAPES[look.shape](u, v, r)
        colour = np.array(_COLOURS[look.colour], dtype=np.float64) * rng.uniform(0.85, 1.05)
        shade = _texture(look.texture, u, v, r, unit)
        image[inside] = shade[inside][:, None] * colour
        labels[inside] = class_id
    image += rng.normal(0, 5, image.shape)  # sensor noise over everything
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), labels


# --------------------------------------------------------------------------------------------------
# Batch folders
# --------------------------------------------------------------------------------------------------


def parse_protocol(spec: str, num_classes: int | None = None) -> list[int]:
    """Classes per step of a protocol: "10-2-2-2-2" -> [10, 2, 2, 2, 2].

    With ``num_classes``, the last number repeats until that many classes are covered:
    "15-1" with 20 -> [15, 1, 1, 1, 1, 1].
    """
    parts = spec.split("-")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ConfigError(
            f"protocol: {spec!r} should be positive class counts joined by '-', like 10-2-2 or 15-1"
        )
    sizes = [int(p) for p in parts]
    if num_classes is not None:
        while sum(sizes) < num_classes:
            sizes.append(sizes[-1])
        if sum(sizes) != num_classes:
            raise ConfigError(
                f"protocol: {spec!r} does not add up to {num_classes} classes (repeating the last step "
                f"gives {sum(sizes)}); choose step sizes that fill exactly {num_classes}"
            )
    return sizes


def _write_split(
    folder: Path,
    count: int,
    rng: np.random.Generator,
    size: int,
    labelled: Sequence[int],
    extras: Sequence[int],
    lut: np.ndarray,
    looks: Sequence[SynthClass],
    objects: tuple[int, int],
) -> None:
    """Write ``count`` image/mask pairs under ``folder``; image i shows class ``labelled[i % n]`` on top."""
    (folder / "images").mkdir(parents=True)
    (folder / "masks").mkdir(parents=True)
    for i in range(count):
        image, labels = render_sample(
            rng, size, labelled[i % len(labelled)], extras, objects=objects, looks=looks
        )
        Image.fromarray(image).save(folder / "images" / f"{i:04d}.png", compress_level=1)
        Image.fromarray(lut[labels]).save(folder / "masks" / f"{i:04d}.png", compress_level=1)


def _write_batch(
    folder: Path,
    *,
    kind: str,
    labelled: Sequence[int],
    extras: Sequence[int],
    values: Sequence[int],
    counts: tuple[int, int],
    size: int,
    seed_key: list[int],
    comment: str,
    drawn: Sequence[int] | None = None,
    looks: Sequence[SynthClass] = CLASSES,
    objects: tuple[int, int] = OBJECTS,
) -> None:
    """One batch folder: classes ``labelled`` get mask ``values`` (others 0); batch.toml written last.

    Image i shows class ``drawn[i % n]`` on top (default: ``labelled``), so a batch that labels more
    classes than it draws (full labels for joint training) has the same images as the step's own batch.
    """
    if folder.exists():
        raise DataError(f"{folder} already exists; remove it or choose another output folder")
    lut = np.zeros(256, dtype=np.uint8)  # synthetic class id -> mask value of this batch
    lut[np.asarray(labelled)] = values
    train_count, val_count = counts
    drawn = labelled if drawn is None else drawn
    train_rng = np.random.default_rng(seed_key + [0])
    _write_split(folder, train_count, train_rng, size, drawn, extras, lut, looks, objects)
    if val_count:
        val_rng = np.random.default_rng(seed_key + [1])
        _write_split(folder / "val", val_count, val_rng, size, drawn, extras, lut, looks, objects)
    lines = [f"# {comment}", f'kind = "{kind}"', "", "[classes]"]
    lines += [f'{value} = "{looks[c - 1].name}"' for value, c in zip(values, labelled, strict=True)]
    staged = folder / ".batch.toml.tmp"
    staged.write_text("\n".join(lines) + "\n")
    os.replace(staged, folder / "batch.toml")  # atomic: a reader sees no manifest or the whole one


def generate_batches(
    out_dir: Path,
    protocol: str = "10-2-2-2-2",
    *,
    train_per_step: int = 40,
    val_per_step: int = 10,
    image_size: int = 64,
    seed: int = 0,
    setting: str = "overlap",
    eval_batch: int = 0,
    prefix: str = "synth",
    num_classes: int | None = None,
    full_labels: bool = False,
    objects: tuple[int, int] = OBJECTS,
) -> list[Path]:
    """Write one batch folder per protocol step under ``out_dir``; return their paths in step order.

    Step t uses the next classes of :data:`SYNTH_CLASSES` in order, labelled with mask values 1..n; other
    objects in its images are background in its masks. ``setting="overlap"`` lets any class of the protocol
    appear in any step's images; ``"disjoint"`` shows only the step's own and earlier classes. Folders are
    ``<prefix>-00-base``, ``<prefix>-01``, ...; with ``eval_batch`` > 0 a last folder ``<prefix>-eval`` of
    that many images, ``kind = "eval"`` and fully labelled (mask value k is the protocol's class k), follows.
    ``num_classes`` fills the protocol up by repeating its last step (see :func:`parse_protocol`).
    ``full_labels=True`` writes the same images with every protocol class labelled (mask value k is class
    k): the data of joint training, the upper bound a protocol is compared with. ``objects`` is the least and
    most objects an image shows (the step's own, on top, among them); fewer make images of a later step show
    earlier classes less often.
    """
    steps = parse_protocol(protocol, num_classes)
    total = sum(steps)
    _check_generation(steps, protocol, setting, image_size, (train_per_step, val_per_step, eval_batch))
    if not 1 <= objects[0] <= objects[1]:
        raise ConfigError(f"objects: {objects} must be (least, most) with 1 <= least <= most")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    everything = list(range(1, total + 1))
    folders, first = [], 1
    for t, count in enumerate(steps):
        own = list(range(first, first + count))
        first += count
        folder = out_dir / (f"{prefix}-{t:02d}-base" if t == 0 else f"{prefix}-{t:02d}")
        _write_batch(
            folder,
            kind="train",
            labelled=everything if full_labels else own,
            extras=everything if setting == "overlap" else list(range(1, own[-1] + 1)),
            values=everything if full_labels else list(range(1, count + 1)),
            counts=(train_per_step, val_per_step),
            size=image_size,
            seed_key=[seed, t],
            comment=f"synthetic step {t} of protocol {protocol} ({setting}), seed {seed}"
            + (", every class labelled" if full_labels else ""),
            drawn=own,
            objects=objects,
        )
        folders.append(folder)
    if eval_batch:
        folder = out_dir / f"{prefix}-eval"
        comment = f"synthetic evaluation set of protocol {protocol}, seed {seed}"
        key = [seed, len(steps)]
        _write_labelled_batch(
            folder, "eval", everything, eval_batch, image_size, key, comment, objects=objects
        )
        folders.append(folder)
    return folders


def _check_generation(
    steps: Sequence[int], protocol: str, setting: str, image_size: int, counts: tuple[int, int, int]
) -> None:
    """:class:`ConfigError` for arguments of :func:`generate_batches` that cannot give every class pixels;
    ``counts`` are its train_per_step, val_per_step and eval_batch."""
    train_per_step, val_per_step, eval_batch = counts
    total = sum(steps)
    if total > len(CLASSES):
        raise ConfigError(
            f"protocol: {protocol!r} needs {total} classes; the synthetic set has {len(CLASSES)}"
        )
    if setting not in SETTINGS:
        raise ConfigError(f"setting: {setting!r} is not one of {', '.join(SETTINGS)}")
    if image_size < 16:
        raise ConfigError(f"image_size: {image_size} must be >= 16")
    if train_per_step < max(steps):
        raise ConfigError(
            f"train_per_step: {train_per_step} must be >= {max(steps)} (the largest step) "
            "so that every class has pixels"
        )
    if val_per_step < 0:
        raise ConfigError(f"val_per_step: {val_per_step} must be >= 0")
    if eval_batch and eval_batch < total:
        raise ConfigError(f"eval_batch: {eval_batch} must be 0 or >= {total} so every class has pixels")


def _write_labelled_batch(
    folder: Path,
    kind: str,
    classes: list[int],
    images: int,
    size: int,
    seed_key: list[int],
    comment: str,
    looks: Sequence[SynthClass] = CLASSES,
    objects: tuple[int, int] = OBJECTS,
) -> None:
    """A batch folder without val/ whose images show ``classes`` only, each labelled with its own id."""
    _write_batch(
        folder,
        kind=kind,
        labelled=classes,
        extras=classes,
        values=classes,
        counts=(images, 0),
        size=size,
        seed_key=seed_key,
        comment=comment,
        looks=looks,
        objects=objects,
    )


def generate_pretraining_batch(
    out_dir: Path, *, images: int, image_size: int = 64, seed: int = 0, name: str = "pretraining"
) -> Path:
    """One training batch folder of :data:`PRETRAINING_CLASSES` (every class labelled, none of a protocol).

    What a backbone is pre-trained on before step 0, standing in for ImageNet (``engine.pretrain``).
    """
    classes = list(range(1, len(PRETRAINING_CLASSES) + 1))
    if images < len(classes):
        raise ConfigError(f"images: {images} must be >= {len(classes)} so that every class has pixels")
    folder = Path(out_dir) / name
    folder.parent.mkdir(parents=True, exist_ok=True)
    _write_labelled_batch(
        folder,
        "train",
        classes,
        images,
        image_size,
        [seed, 1_000],
        f"synthetic pre-training classes, seed {seed}",
        looks=PRETRAINING_CLASSES,
    )
    return folder
