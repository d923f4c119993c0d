"""Read and decode a batch's files safely: no link followed, no oversized image allocated.

:func:`read_file` opens without following links and records each file's hash as it reads it, so the
batch's hash covers exactly the bytes checked. :func:`image_size` and :func:`mask_histogram` refuse an
image whose header claims more than the limits before any pixel is decoded; every fault of a file, hostile
or damaged, becomes a :class:`Refused` carrying the problem's wording, never another exception.
"""

import hashlib
import io
import os
import stat
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

# 8-bit modes that convert to RGB faithfully; 16-bit and float images would be clipped by the loader.
_IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})
_MASK_MODES = ("L", "P")
_REEXPORT = "export it again from the original (a PNG or JPEG that opens in an image viewer)"


@dataclass(frozen=True)
class Limits:
    """The largest batch and image accepted."""

    max_batch_bytes: int
    max_files: int
    max_image_pixels: int
    max_image_side: int


class Refused(Exception):
    """A file was read but is not acceptable; carries the problem's wording."""

    def __init__(self, what: str, todo: str) -> None:
        super().__init__(what)
        self.what = what
        self.todo = todo


def read_file(folder: Path, rel: str, digests: dict[str, tuple[int, str]]) -> bytes:
    """The bytes of `rel`, recording their hash; refuses a link or special file swapped in after listing."""
    fd = os.open(folder / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{rel} is no longer a regular file")
        data = handle.read()
    digests[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return data


def image_size(data: bytes, limits: Limits) -> tuple[int, int]:
    """(width, height) of an 8-bit PNG or JPEG image, decoded fully; raises `Refused`."""
    with _decode(data, limits, ("PNG", "JPEG")) as image:
        if image.mode not in _IMAGE_MODES:
            raise Refused(f"has mode {image.mode} (not 8-bit)", "save it as an 8-bit RGB JPEG or PNG")
        return image.size


def mask_histogram(data: bytes, limits: Limits) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels per raw value (256,) and (width, height) of a single-channel 8-bit PNG mask."""
    with _decode(data, limits, ("PNG",)) as mask:
        if mask.mode not in _MASK_MODES:
            raise Refused(
                f"is a {mask.mode} image, not a single-channel 8-bit mask",
                "save it as a single-channel 8-bit PNG (mode L or P) whose pixel values are the class values",
            )
        # Image.histogram counts raw values (palette indices for mode P) in C, without copying the pixels.
        return np.asarray(mask.histogram(), dtype=np.int64), mask.size


def _decode(data: bytes, limits: Limits, formats: tuple[str, ...]) -> Image.Image:
    """Decode `data` fully, refusing an oversized header before any pixel is allocated; raises `Refused`."""
    try:
        with warnings.catch_warnings():
            # Pillow warns on large headers; our own limit, checked below, decides.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=formats) as probe:
                width, height = probe.size
                _check_size(width, height, limits)
                probe.verify()  # checksums and chunk structure, without decoding pixels
            image = Image.open(io.BytesIO(data), formats=formats)
        image.load()
        return image
    except Refused:
        raise
    except Image.DecompressionBombError:
        raise Refused(
            f"claims more than {limits.max_image_pixels} pixels in its header",
            f"resize it to at most {limits.max_image_pixels} pixels",
        ) from None
    except UnidentifiedImageError:
        raise Refused(f"is not a {' or '.join(formats)} image", _REEXPORT) from None
    except Exception as exc:  # hostile files raise anything; each becomes a problem
        raise Refused(
            f"is damaged or truncated and cannot be decoded ({type(exc).__name__}: {exc})", _REEXPORT
        ) from None


def _check_size(width: int, height: int, limits: Limits) -> None:
    if max(width, height) > limits.max_image_side or width * height > limits.max_image_pixels:
        raise Refused(
            f"is {width}x{height}, larger than the limit of {limits.max_image_side} pixels a side "
            f"and {limits.max_image_pixels} pixels in all",
            "resize it (and its mask) to fit the limit",
        )
