"""Check a batch folder before anything is recorded, and say in plain words every problem found.

`validate_batch` never follows a symlink, refuses oversized image headers before any pixel is allocated,
and turns every error met while reading a file into a `Problem` for that file, so hostile input yields a
report, never an exception. It imports numpy and Pillow only: the daemon calls it on its fast path.
"""

import hashlib
import io
import os
import stat
import tomllib
import warnings
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from engine.batch_format import (
    BACKGROUND,
    IGNORE,
    IMAGE_SUFFIXES,
    MANIFEST,
    MANIFEST_EXAMPLE,
    MASK_SUFFIX,
    ParsedManifest,
    Problem,
    join_values,
    parse_manifest,
)

# 8-bit modes that convert to RGB faithfully; 16-bit and float images would be clipped by the loader.
_IMAGE_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr"})
_MASK_MODES = ("L", "P")
_MAX_MANIFEST_BYTES = 1024 * 1024
_MAX_LISTED_VALUES = 20
_REEXPORT = "export it again from the original (a PNG or JPEG that opens in an image viewer)"


def group_problems(problems: list[Problem], *, shown: int = 3) -> list[Problem]:
    """One problem per kind: the same fault in many files (an undeclared value in 26 masks) is listed once,
    with its first ``shown`` files and the count, where it first occurred."""
    groups: dict[tuple[str, str], list[Problem]] = {}
    for problem in problems:
        groups.setdefault((problem.what, problem.todo), []).append(problem)
    grouped = []
    for (what, todo), members in groups.items():
        files = list(dict.fromkeys(p.file for p in members))
        if len(files) == 1:
            grouped.append(members[0])
            continue
        named = ", ".join(files[:shown])
        more = f" and {len(files) - shown} more" if len(files) > shown else ""
        grouped.append(Problem(f"{named}{more} ({len(files)} files)", what, todo))
    return grouped


@dataclass(frozen=True)
class ValidatedBatch:
    """A batch that passed every check, with what the daemon records about it."""

    name: str
    kind: str
    classes: dict[int, str]  # mask value -> class name
    sha256: str  # over sorted relative paths and bytes of the manifest, images and masks
    train_stems: list[str]
    val_stems: list[str]
    pixel_counts: dict[int, int]  # declared mask value -> pixels in train and val masks
    total_bytes: int


@dataclass(frozen=True)
class ValidationResult:
    """`batch` is set only when `problems` is empty."""

    batch: ValidatedBatch | None
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return self.batch is not None and not self.problems


def printable(path: str) -> str:
    """`path` as printable text whatever bytes it holds (undecodable bytes and control characters escaped)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


@dataclass(frozen=True)
class _Limits:
    max_batch_bytes: int
    max_files: int
    max_image_pixels: int
    max_image_side: int


@dataclass
class _Listing:
    """What a walk of the batch folder found, links and special files excluded."""

    files: dict[str, int] = field(default_factory=dict)  # relative path -> size in bytes
    dirs: set[str] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    entries: int = 0
    truncated: bool = False  # stopped early: more entries than max_files


class _Refused(Exception):
    """A file was read but is not acceptable; carries the problem's wording."""

    def __init__(self, what: str, todo: str) -> None:
        super().__init__(what)
        self.what = what
        self.todo = todo


def validate_batch(
    folder: Path,
    *,
    taught_names: Collection[str] = (),
    known_hashes: Callable[[str], bool] | Collection[str] = (),
    max_batch_bytes: int = 2 * 1024**3,
    max_files: int = 50_000,
    max_image_pixels: int = 40_000_000,
    max_image_side: int = 8192,
) -> ValidationResult:
    """Check the batch in `folder` against the product's rules and report every problem found.

    `taught_names` are class names already taught or pending in an unfinished step (refused in a training
    batch); `known_hashes` are the content hashes of live batches accepted before, as a collection or a
    membership test. Pillow's own decompression-bomb limit (about 179 million pixels) caps
    `max_image_pixels`.
    """
    limits = _Limits(max_batch_bytes, max_files, max_image_pixels, max_image_side)
    folder = Path(folder)
    folder_problem = _folder_problem(folder)
    if folder_problem is not None:
        return ValidationResult(None, [folder_problem])

    listing = _list_folder(folder, max_files)
    problems: list[Problem] = []
    name_problem = _name_problem(folder.name)
    if name_problem is not None:
        problems.append(Problem(".", f"the folder name {name_problem}", "rename the folder"))

    digests: dict[str, tuple[int, str]] = {}  # relative path -> (size, sha256 of its bytes)
    manifest = _check_manifest(folder, listing, digests)
    problems += manifest.problems
    problems += listing.problems

    total_bytes = sum(listing.files.values())
    within_limits = True
    if listing.truncated:
        within_limits = False
        problems.append(
            Problem(
                ".",
                f"holds more than {max_files} files and folders (contents were not checked)",
                f"split it into batches of at most {max_files} files",
            )
        )
    if total_bytes > max_batch_bytes:
        within_limits = False
        problems.append(
            Problem(
                ".",
                f"holds {_human_bytes(total_bytes)}, more than the limit of {_human_bytes(max_batch_bytes)} "
                "(contents were not checked)",
                "split it into smaller batches",
            )
        )

    train = _check_split(folder, "", listing, manifest, limits, digests, within_limits, required=True)
    val = _check_split(folder, "val/", listing, manifest, limits, digests, within_limits, required=False)
    problems += train.problems + val.problems

    classes = manifest.classes or {}
    # An evaluation batch is wholly held out, so any of its pixels count; training classes must be learnable.
    scored = train.counts + val.counts if manifest.kind == "eval" else train.counts
    counted_everywhere = (
        within_limits and train.masks_complete and (manifest.kind != "eval" or val.masks_complete)
    )
    if manifest.classes is not None and counted_everywhere:
        where = "masks/ or val/masks/" if manifest.kind == "eval" else "masks/"
        for value, name in sorted(classes.items()):
            if scored[value] == 0:
                problems.append(
                    Problem(
                        MANIFEST,
                        f'class "{name}" (value {value}) has no pixels in any mask under {where}',
                        "label it in at least one mask, or remove it from [classes]",
                    )
                )
    if manifest.kind == "train":
        for value, name in sorted(classes.items()):
            if name in taught_names:
                problems.append(
                    Problem(
                        MANIFEST,
                        f'class "{name}" (value {value}) is already taught, or waits to be in an earlier '
                        "step",
                        "a training batch may only teach new classes: remove it from [classes] and set its "
                        'pixels to 0 or 255, rename it if it is a different class, or set kind = "eval" '
                        "for an evaluation set",
                    )
                )

    sha256 = _combined_hash(digests)
    everything_read = within_limits and train.read_complete and val.read_complete and MANIFEST in digests
    if everything_read and _is_known(sha256, known_hashes):
        problems.append(
            Problem(
                ".",
                "is identical to a batch accepted before (same files, same content)",
                "nothing to do, it is learnt or waiting to be; to teach new classes submit new data",
            )
        )

    if problems:
        return ValidationResult(None, group_problems(problems))
    all_counts = train.counts + val.counts
    batch = ValidatedBatch(
        name=folder.name,
        kind=manifest.kind,
        classes=dict(sorted(classes.items())),
        sha256=sha256,
        train_stems=train.stems,
        val_stems=val.stems,
        pixel_counts={value: int(all_counts[value]) for value in sorted(classes)},
        total_bytes=total_bytes,
    )
    return ValidationResult(batch, [])


def _folder_problem(folder: Path) -> Problem | None:
    try:
        mode = os.lstat(folder).st_mode
    except OSError as exc:
        return Problem(".", f"cannot be read ({exc.strerror})", "check that the batch folder exists")
    if stat.S_ISLNK(mode):
        return Problem(".", "is a symbolic link", "put the folder itself in the inbox, not a link to it")
    if not stat.S_ISDIR(mode):
        return Problem(".", "is not a folder", "a batch is a folder holding batch.toml, images/ and masks/")
    return None


def _list_folder(folder: Path, max_files: int) -> _Listing:
    """Walk `folder` without following links, stopping after `max_files` entries.

    Iterative, so depth cannot exhaust the stack; lazy, so a folder of millions of files costs little.
    """
    listing = _Listing()
    pending = [""]
    while pending and not listing.truncated:
        rel_dir = pending.pop()
        try:
            with os.scandir(os.path.join(folder, rel_dir)) as scan:
                for entry in scan:
                    listing.entries += 1
                    if listing.entries > max_files:
                        listing.truncated = True
                        break
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    problem = _entry_problem(folder, rel, entry)
                    if problem is not None:
                        listing.problems.append(problem)
                    elif entry.is_dir(follow_symlinks=False):
                        listing.dirs.add(rel)
                        pending.append(rel)
                    else:
                        listing.files[rel] = entry.stat(follow_symlinks=False).st_size
        except OSError as exc:
            where = printable(rel_dir) + "/" if rel_dir else "."
            listing.problems.append(Problem(where, f"cannot be listed ({exc.strerror})", "make it readable"))
    listing.problems.sort(key=lambda problem: problem.file)
    return listing


def _entry_problem(folder: Path, rel: str, entry: os.DirEntry) -> Problem | None:
    """A problem for a bad name, a link or a special file; None for a plain file or folder."""
    name_problem = _name_problem(entry.name)
    if name_problem is not None:
        return Problem(
            printable(rel), f"its name {name_problem}", "rename it using printable UTF-8 characters"
        )
    try:
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError as exc:
        return Problem(rel, f"cannot be read ({exc.strerror})", "make it readable")
    if stat.S_ISLNK(mode):
        return _link_problem(folder, rel)
    if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
        return Problem(rel, "is not a regular file (a device, pipe or socket)", "remove it from the batch")
    return None


def _link_problem(folder: Path, rel: str) -> Problem:
    todo = "replace the link with a copy of the file it points to; a batch may not contain links"
    try:
        target = os.readlink(folder / rel)
        resolved = os.path.realpath(folder / rel)
        inside = os.path.commonpath([os.path.realpath(folder), resolved]) == os.path.realpath(folder)
    except (OSError, ValueError):
        return Problem(rel, "is a symbolic link", todo)
    if not inside:
        return Problem(
            rel, f"is a symbolic link pointing outside the batch folder (to {printable(target)})", todo
        )
    return Problem(rel, "is a symbolic link", todo)


def _name_problem(name: str) -> str | None:
    """Why a file name cannot be recorded or printed, or None when it can."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # os.scandir hands undecodable bytes back as surrogate escapes; show the raw bytes.
        return f"is not valid UTF-8 ({os.fsencode(name)!r})"
    if not name.isprintable():
        return f"contains control characters ({name!r})"
    return None


def _check_manifest(folder: Path, listing: _Listing, digests: dict[str, tuple[int, str]]) -> ParsedManifest:
    size = listing.files.get(MANIFEST)
    if size is None:
        if MANIFEST in listing.dirs:
            what = "is a folder"
        elif any(problem.file == MANIFEST for problem in listing.problems):
            return ParsedManifest("train", None, [])  # already reported as a link or special file
        else:
            what = "is missing"
        todo = f"write batch.toml last, after images/ and masks/ ({MANIFEST_EXAMPLE})"
        return ParsedManifest("train", None, [Problem(MANIFEST, what, todo)])
    if size > _MAX_MANIFEST_BYTES:
        return ParsedManifest(
            "train",
            None,
            [Problem(MANIFEST, "is larger than 1 MiB", f"keep only the manifest ({MANIFEST_EXAMPLE})")],
        )
    try:
        data = _read(folder, MANIFEST, digests)
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return ParsedManifest("train", None, [Problem(MANIFEST, "is not UTF-8 text", "save it as UTF-8")])
    except OSError as exc:
        return ParsedManifest(
            "train", None, [Problem(MANIFEST, f"cannot be read ({exc})", "make it readable")]
        )
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message ends with "(at line L, column C)"; a key given twice is reported here by TOML itself.
        return ParsedManifest(
            "train",
            None,
            [Problem(MANIFEST, f"is not valid TOML: {exc}", f"fix the syntax ({MANIFEST_EXAMPLE})")],
        )
    except Exception as exc:  # e.g. RecursionError on absurd nesting; still only a problem
        return ParsedManifest(
            "train", None, [Problem(MANIFEST, f"cannot be parsed ({type(exc).__name__})", "simplify it")]
        )
    return parse_manifest(document)


@dataclass
class _Split:
    """What the images/ and masks/ of one split (train or val) hold."""

    stems: list[str] = field(default_factory=list)
    # (256,) pixels per raw mask value
    counts: np.ndarray = field(default_factory=lambda: np.zeros(256, dtype=np.int64))
    problems: list[Problem] = field(default_factory=list)
    masks_complete: bool = True  # every mask was decoded, so `counts` is whole
    read_complete: bool = True  # every image and mask was read, so the hash is whole


def _check_split(
    folder: Path,
    prefix: str,
    listing: _Listing,
    manifest: ParsedManifest,
    limits: _Limits,
    digests: dict[str, tuple[int, str]],
    read_contents: bool,
    *,
    required: bool,
) -> _Split:
    """Check `<prefix>images/` against `<prefix>masks/`; the val split (prefix "val/") is optional."""
    split = _Split()
    images_dir, masks_dir = f"{prefix}images", f"{prefix}masks"
    if not required and prefix.rstrip("/") not in listing.dirs:
        return split
    if listing.truncated:
        # A partial listing would make up missing masks and orphans; the size problem says enough.
        split.masks_complete = split.read_complete = False
        return split
    images = _split_files(
        listing,
        images_dir,
        IMAGE_SUFFIXES,
        split.problems,
        "an image (.jpg, .jpeg or .png)",
        exact_suffix=False,
    )
    masks = _split_files(
        listing, masks_dir, (MASK_SUFFIX,), split.problems, "a mask (.png)", exact_suffix=True
    )
    if images is None:
        split.problems.append(
            Problem(f"{images_dir}/", "is missing", "put the RGB images (.jpg, .jpeg or .png) in it")
        )
    elif not images:
        split.problems.append(
            Problem(f"{images_dir}/", "holds no images", "add the RGB images, or remove the folder")
        )
    if masks is None:
        split.problems.append(Problem(f"{masks_dir}/", "is missing", "put one PNG mask per image in it"))

    images_by_stem: dict[str, str] = {}
    for rel in images or []:
        stem = Path(rel).stem
        if stem in images_by_stem:
            split.problems.append(
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
                split.problems.append(
                    Problem(rel, "has no mask", f"add {masks_dir}/{stem}{MASK_SUFFIX}, or remove the image")
                )
    if images is not None:
        for stem, rel in masks_by_stem.items():
            if stem not in images_by_stem:
                split.problems.append(
                    Problem(
                        rel,
                        f"has no image with the same name in {images_dir}/",
                        f"add {images_dir}/{stem}.jpg or .png, or remove the mask",
                    )
                )
    split.stems = sorted(set(images_by_stem) & set(masks_by_stem))
    if not read_contents:
        split.masks_complete = split.read_complete = False
        return split

    sizes: dict[str, tuple[int, int]] = {}  # stem -> (width, height) of its decoded image
    for stem, rel in sorted(images_by_stem.items()):
        try:
            with _decode(_read(folder, rel, digests), limits, ("PNG", "JPEG")) as image:
                if image.mode not in _IMAGE_MODES:
                    raise _Refused(
                        f"has mode {image.mode} (not 8-bit)", "save it as an 8-bit RGB JPEG or PNG"
                    )
                sizes[stem] = image.size
        except OSError as exc:
            split.read_complete = False
            split.problems.append(Problem(rel, f"cannot be read ({exc.strerror or exc})", "make it readable"))
        except _Refused as refused:
            split.problems.append(Problem(rel, refused.what, refused.todo))
    declared = set(manifest.classes or ())
    allowed = np.zeros(256, dtype=bool)
    allowed[[BACKGROUND, IGNORE, *declared]] = True
    for stem, rel in sorted(masks_by_stem.items()):
        try:
            counts, size = _mask_histogram(_read(folder, rel, digests), limits)
        except OSError as exc:
            split.read_complete = split.masks_complete = False
            split.problems.append(Problem(rel, f"cannot be read ({exc.strerror or exc})", "make it readable"))
            continue
        except _Refused as refused:
            split.masks_complete = False
            split.problems.append(Problem(rel, refused.what, refused.todo))
            continue
        split.counts += counts
        image_size = sizes.get(stem)
        if image_size is not None and image_size != size:
            split.problems.append(
                Problem(
                    rel,
                    f"is {size[0]}x{size[1]} but {images_by_stem[stem]} is {image_size[0]}x{image_size[1]}",
                    "resize the mask to its image",
                )
            )
        unknown = np.flatnonzero((counts > 0) & ~allowed)
        if manifest.classes is not None and unknown.size:
            split.problems.append(
                Problem(
                    rel,
                    f"contains {_values_phrase(unknown.tolist())} not declared in batch.toml [classes]",
                    f"declare {'it' if unknown.size == 1 else 'them'} in [classes], or set those pixels to 0 "
                    "(background) or 255 (ignore)",
                )
            )
    return split


def _split_files(
    listing: _Listing,
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


def _read(folder: Path, rel: str, digests: dict[str, tuple[int, str]]) -> bytes:
    """The bytes of `rel`, recording their hash; refuses a link or special file swapped in after listing."""
    fd = os.open(folder / rel, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{rel} is no longer a regular file")
        data = handle.read()
    digests[rel] = (len(data), hashlib.sha256(data).hexdigest())
    return data


def _decode(data: bytes, limits: _Limits, formats: tuple[str, ...]) -> Image.Image:
    """Decode `data` fully, refusing an oversized header before any pixel is allocated; raises `_Refused`."""
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
    except _Refused:
        raise
    except Image.DecompressionBombError:
        raise _Refused(
            f"claims more than {limits.max_image_pixels} pixels in its header",
            f"resize it to at most {limits.max_image_pixels} pixels",
        ) from None
    except UnidentifiedImageError:
        raise _Refused(f"is not a {' or '.join(formats)} image", _REEXPORT) from None
    except Exception as exc:  # hostile files raise anything; each becomes a problem
        raise _Refused(
            f"is damaged or truncated and cannot be decoded ({type(exc).__name__}: {exc})", _REEXPORT
        ) from None


def _check_size(width: int, height: int, limits: _Limits) -> None:
    if max(width, height) > limits.max_image_side or width * height > limits.max_image_pixels:
        raise _Refused(
            f"is {width}x{height}, larger than the limit of {limits.max_image_side} pixels a side "
            f"and {limits.max_image_pixels} pixels in all",
            "resize it (and its mask) to fit the limit",
        )


def _mask_histogram(data: bytes, limits: _Limits) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixels per raw value (256,) and (width, height) of a single-channel 8-bit PNG mask."""
    with _decode(data, limits, ("PNG",)) as mask:
        if mask.mode not in _MASK_MODES:
            raise _Refused(
                f"is a {mask.mode} image, not a single-channel 8-bit mask",
                "save it as a single-channel 8-bit PNG (mode L or P) whose pixel values are the class values",
            )
        # Image.histogram counts raw values (palette indices for mode P) in C, without copying the pixels.
        return np.asarray(mask.histogram(), dtype=np.int64), mask.size


def _combined_hash(digests: dict[str, tuple[int, str]]) -> str:
    """One hash over the sorted relative paths and contents: independent of mtimes and the folder name."""
    combined = hashlib.sha256()
    for rel in sorted(digests):
        size, digest = digests[rel]
        combined.update(f"{rel}\0{size}\0{digest}\n".encode())
    return combined.hexdigest()


def _is_known(sha256: str, known_hashes: Callable[[str], bool] | Collection[str]) -> bool:
    return known_hashes(sha256) if callable(known_hashes) else sha256 in known_hashes


def _values_phrase(values: list[int]) -> str:
    if len(values) == 1:
        return f"value {values[0]}"
    return f"values {join_values(values)}"


def _human_bytes(size: int) -> str:
    amount, unit = float(size), "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if amount < 1024:
            break
        amount, unit = amount / 1024, larger
    return f"{size} bytes" if unit == "bytes" else f"{amount:.1f} {unit}"
