"""Pictures of label maps, and `ciss predict`: class-index, colour and overlay PNGs with a legend.

Colours come from one palette indexed by global class id: 0 (background) is black, class k has a colour
that stays the same across models, so a class keeps its colour as the model learns more classes. Label
values beyond the palette (255, ignore, in ground-truth masks) are drawn white.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ciss_daemon.exceptions import CissError
from engine.evaluate import predict_labels
from engine.exceptions import DataError
from engine.model import DKDSegmenter, upsample
from engine.runner import load_model, resolve_device
from engine.transforms import normalize_image, read_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
OUTPUT_SUFFIXES = (".labels.png", ".colour.png", ".overlay.png")
OUT_OF_PALETTE = (255, 255, 255)  # ignore (255) and any value the palette has no colour for

_SWATCH = 14  # legend swatch side, pixels
_PAD = 6


class PredictError(CissError):
    """``ciss predict`` cannot start: missing inputs or an output folder it cannot write."""


def palette(num_classes: int) -> np.ndarray:
    """Colours of classes 0..num_classes: uint8 ``(num_classes + 1, 3)``, row 0 black.

    The bits of the class id are dealt out in turn to red, green and blue, from each channel's most
    significant bit down (the PASCAL VOC scheme). Ids below 2**24 get distinct colours, neighbouring ids get
    very different ones, and the colour of an id does not depend on ``num_classes``.
    """
    if num_classes < 0:
        raise ValueError(f"num_classes: {num_classes} must be >= 0")
    ids = np.arange(num_classes + 1, dtype=np.int64)
    colours = np.zeros((num_classes + 1, 3), dtype=np.int64)
    for shift in range(8):  # 8 rounds of 3 bits: one bit per channel per round
        for channel in range(3):
            bit = (ids >> (3 * shift + channel)) & 1
            colours[:, channel] |= bit << (7 - shift)
    return colours.astype(np.uint8)


# Colour words a class name may hold ("orange-plate", "striped_blue_disc"): that class is drawn in it.
COLOUR_WORDS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 220, 30),
    "orange": (255, 140, 0),
    "purple": (130, 50, 170),
    "magenta": (220, 40, 200),
    "pink": (255, 150, 190),
    "cyan": (40, 210, 220),
    "brown": (140, 80, 30),
    "white": (245, 245, 245),
    "black": (40, 40, 40),
    "grey": (128, 128, 128),
    "gray": (128, 128, 128),
}


def class_palette(
    class_names: Mapping[int, str], colours: Mapping[str, tuple[int, int, int]] | None = None
) -> np.ndarray:
    """Colours of classes 0..max id, uint8 ``(K + 1, 3)``: a class's own colour from batch.toml's [colors]
    (``colours``: name -> RGB), else the colour word in its name, else the VOC palette's."""
    table = palette(max(class_names, default=0))
    for class_id, name in class_names.items():
        words = re.split(r"[^a-z]+", name.lower())
        named = next((COLOUR_WORDS[w] for w in words if w in COLOUR_WORDS), None)
        chosen = (colours or {}).get(name) or named
        if chosen is not None and class_id > 0:
            table[class_id] = chosen
    return table


def colour_mask(labels: np.ndarray, palette: np.ndarray) -> Image.Image:
    """Label map ``(H, W)`` of class ids -> RGB image ``(H, W)``; ids outside the palette are white."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels: expected a (H, W) label map, got shape {labels.shape}")
    if labels.size and labels.min() < 0:
        raise ValueError("labels: class ids must be >= 0")
    # A lookup table as long as the largest id, so one fancy-indexing pass colours every pixel.
    size = max(len(palette), int(labels.max()) + 1 if labels.size else 0)
    lut = np.empty((size, 3), dtype=np.uint8)
    lut[:] = OUT_OF_PALETTE
    lut[: len(palette)] = palette
    return Image.fromarray(lut[labels])  # (H, W, 3) uint8


def overlay(image: Image.Image, labels: np.ndarray, palette: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """``image`` with every non-background pixel tinted by its class colour (``alpha``: colour weight)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha: {alpha} must be between 0 and 1")
    labels = np.asarray(labels)
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)  # (H, W, 3)
    if rgb.shape[:2] != labels.shape:
        raise ValueError(f"labels {labels.shape} and image {rgb.shape[:2]} differ in size")
    colours = np.asarray(colour_mask(labels, palette), dtype=np.float32)  # (H, W, 3)
    blended = (1.0 - alpha) * rgb + alpha * colours
    # Background stays untouched so the scene remains readable around the predicted objects.
    out = np.where((labels != 0)[..., None], blended, rgb)
    return Image.fromarray(np.rint(out).astype(np.uint8))


def with_legend(
    image: Image.Image,
    class_names: Mapping[int, str],
    palette: np.ndarray,
    present: Iterable[int] | None = None,
) -> Image.Image:
    """``image`` with a white strip on its right listing a colour swatch and the name of each class.

    ``present`` limits the legend to those class ids (e.g. the classes found in one prediction); None lists
    every class of ``class_names``. Background (0) is not listed: it is black in colour masks and untinted
    in overlays. Ids without a name are listed as "class <id>".
    """
    ids = sorted(class_names) if present is None else sorted({int(k) for k in present})
    ids = [k for k in ids if k != 0]
    entries: list[tuple[int | None, str]] = [(k, class_names.get(k, f"class {k}")) for k in ids]
    entries = entries or [(None, "no class found")]
    font = ImageFont.load_default()
    text_boxes = [font.getbbox(name) for _, name in entries]  # (left, top, right, bottom) each
    row = max(_SWATCH, *(box[3] - box[1] for box in text_boxes)) + _PAD
    strip_width = int(_PAD * 3 + _SWATCH + max(box[2] - box[0] for box in text_boxes))
    height = int(max(image.height, _PAD + row * len(entries)))

    canvas = Image.new("RGB", (image.width + strip_width, height), "white")
    canvas.paste(image.convert("RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    left = image.width + _PAD
    for index, ((class_id, name), box) in enumerate(zip(entries, text_boxes, strict=True)):
        top = _PAD + index * row
        if class_id is not None:
            colour = tuple(int(c) for c in palette[class_id]) if class_id < len(palette) else OUT_OF_PALETTE
            # The outline keeps dark swatches visible against the white strip.
            draw.rectangle((left, top, left + _SWATCH, top + _SWATCH), fill=colour, outline="grey")
        text_top = top + (_SWATCH - (box[3] - box[1])) // 2 - box[1]
        draw.text((left + _SWATCH + _PAD, text_top), name, fill="black", font=font)
    return canvas


def predict_image(
    model: DKDSegmenter, image: Image.Image, *, device: torch.device, max_size: int | None = 1024
) -> np.ndarray:
    """Label map ``(H, W)`` int64 of an RGB ``image`` of size ``(W, H)``, by the prediction rule.

    An image whose longer side exceeds ``max_size`` is shrunk for inference and its labels are enlarged
    back with nearest neighbour: logits at full size would take (1 + K) * H * W floats.
    ``model`` must be in eval mode.
    """
    width, height = image.size
    small = image
    if max_size is not None and max(width, height) > max_size:
        factor = max_size / max(width, height)
        small = image.resize(
            (max(1, round(width * factor)), max(1, round(height * factor))), Image.Resampling.BILINEAR
        )
    pixels = normalize_image(small)[None].to(device)  # (1, 3, h, w)
    with torch.inference_mode():
        logits = upsample(model(pixels).logits, pixels.shape[-2:])  # (1, 1 + K, h, w)
        labels = predict_labels(logits)  # (1, h, w)
        if labels.shape[-2:] != (height, width):
            labels = F.interpolate(labels[None].float(), size=(height, width), mode="nearest")[0].long()
    return labels[0].cpu().numpy()


_PNG_KINDS = ("labels", "colour", "overlay")  # the files predict_images writes per image


@dataclass(frozen=True)
class PredictionFiles:
    """What ``predict_images`` made of one input image: its three PNGs, or why it failed."""

    image: Path
    labels: Path | None = None  # class-index PNG (mode L; 16-bit for models of more than 255 classes)
    colour: Path | None = None  # colour mask with legend
    overlay: Path | None = None  # the image tinted by the colour mask, with legend
    classes: tuple[int, ...] = ()  # class ids found, background excluded
    error: str | None = None  # one line when the image could not be read

    @property
    def ok(self) -> bool:
        return self.error is None


def expand_inputs(paths: Iterable[Path]) -> list[Path]:
    """Image files named by ``paths``: a folder gives its .jpg/.jpeg/.png files (not its subfolders), sorted.

    Files named directly are kept whatever their extension. Earlier ``ciss predict`` outputs found in a
    folder are skipped, so predicting into the input folder twice does not predict on predictions.
    Raises PredictError listing every missing path, or naming a folder without images.
    """
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise PredictError(f"no such file or folder: {', '.join(missing)}; check the paths")
    images: list[Path] = []
    for path in paths:
        if not path.is_dir():
            images.append(path)
            continue
        found = sorted(
            p
            for p in path.iterdir()
            if p.is_file()
            and p.suffix.lower() in IMAGE_SUFFIXES
            and not p.name.startswith(".")
            and not p.name.lower().endswith(OUTPUT_SUFFIXES)
        )
        if not found:
            raise PredictError(
                f"folder {path} holds no .jpg, .jpeg or .png image; give image files or folders"
            )
        images.extend(found)
    return list(dict.fromkeys(images))  # a file named twice is predicted once


def _unique_stems(images: Sequence[Path]) -> list[str]:
    """Output stems, with -2, -3, ... added where two inputs share a stem (a/x.jpg and b/x.png)."""
    used: set[str] = set()
    stems = []
    for image in images:
        stem, count = image.stem, 1
        while stem in used:  # also steps over an input whose own stem looks like "x-2"
            count += 1
            stem = f"{image.stem}-{count}"
        used.add(stem)
        stems.append(stem)
    return stems


def predict_images(
    model_dir: Path,
    images: Sequence[Path],
    out_dir: Path,
    *,
    device: str = "cpu",
    progress: Callable[[int, int], None] | None = None,
    max_size: int | None = 1024,
    class_colours: Mapping[str, tuple[int, int, int]] | None = None,
) -> list[PredictionFiles]:
    """Predict every image with the model in ``model_dir``, writing three PNGs per image into ``out_dir``.

    ``<stem>.labels.png`` holds class ids, ``<stem>.colour.png`` the colour mask and ``<stem>.overlay.png``
    the tinted image, both with a legend of the classes found. ``model_dir`` must be a resolved model folder
    (``promotion.resolve_current``), so a promotion during the run cannot mix two models. An image that
    cannot be read is reported in its ``PredictionFiles.error`` and the others go on; ``progress(done,
    total)`` is called after each image; ``class_colours`` (name -> RGB) are the batches' [colors].
    """
    if max_size is not None and max_size < 1:
        raise PredictError(f"max_size: {max_size} must be >= 1, or None for full size")
    model, meta = load_model(Path(model_dir), resolve_device(device))
    model.eval()
    class_names = {int(c["id"]): str(c["name"]) for c in meta["classes"]}
    colours = class_palette(class_names, class_colours)
    label_dtype = np.uint8 if model.num_classes <= 255 else np.uint16
    created = not out_dir.exists()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PredictError(
            f"cannot create the output folder {out_dir}: {exc.strerror}; choose another"
        ) from None
    try:
        return _predict_all(model, images, out_dir, class_names, colours, label_dtype, progress, max_size)
    finally:
        if created and not any(out_dir.iterdir()):
            out_dir.rmdir()  # nothing was predicted: leave no empty folder behind


def _predict_all(
    model: DKDSegmenter,
    images: Sequence[Path],
    out_dir: Path,
    class_names: dict[int, str],
    colours: np.ndarray,
    label_dtype: type,
    progress: Callable[[int, int], None] | None,
    max_size: int | None,
) -> list[PredictionFiles]:
    results = []
    for done, (path, stem) in enumerate(zip(images, _unique_stems(images), strict=True), start=1):
        try:
            image = read_image(path)
        except DataError as exc:
            results.append(PredictionFiles(image=path, error=str(exc)))
        else:
            labels = predict_image(model, image, device=model.aux_classifier.weight.device, max_size=max_size)
            found = tuple(int(k) for k in np.unique(labels) if k != 0)
            labels_png, colour_png, overlay_png = (out_dir / f"{stem}.{kind}.png" for kind in _PNG_KINDS)
            files = PredictionFiles(path, labels_png, colour_png, overlay_png, classes=found)
            try:
                Image.fromarray(labels.astype(label_dtype)).save(labels_png)
                with_legend(colour_mask(labels, colours), class_names, colours, found).save(colour_png)
                with_legend(overlay(image, labels, colours), class_names, colours, found).save(overlay_png)
            except OSError as exc:
                raise PredictError(
                    f"cannot write predictions of {path} into {out_dir}: {exc.strerror or exc}; "
                    "check the free space and permissions"
                ) from None
            results.append(files)
        if progress is not None:
            progress(done, len(images))
    return results
