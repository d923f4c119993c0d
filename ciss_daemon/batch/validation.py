"""Check a batch folder before anything is recorded, and say in plain words every problem found.

`validate_batch` never follows a symlink, refuses oversized image headers before any pixel is allocated,
and turns every error met while reading a file into a `Problem` for that file, so hostile input yields a
report, never an exception. It imports numpy and Pillow only: the daemon calls it on its fast path. The
folder is walked by ``listing.py``, its files read by ``reading.py`` and each split checked by
``splits.py``; here are the manifest, the limits of the whole batch and the rules across splits.
"""

import hashlib
import tomllib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path

from ciss_daemon.batch.listing import Listing, folder_problem, list_folder, name_problem
from ciss_daemon.batch.reading import Limits, read_file
from ciss_daemon.batch.splits import Split, check_split
from engine.batch_format import MANIFEST, MANIFEST_EXAMPLE, ParsedManifest, Problem, parse_manifest

_MAX_MANIFEST_BYTES = 1024 * 1024


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
    limits = Limits(max_batch_bytes, max_files, max_image_pixels, max_image_side)
    folder = Path(folder)
    problem = folder_problem(folder)
    if problem is not None:
        return ValidationResult(None, [problem])

    listing = list_folder(folder, max_files)
    problems: list[Problem] = []
    why = name_problem(folder.name)
    if why is not None:
        problems.append(Problem(".", f"the folder name {why}", "rename the folder"))

    digests: dict[str, tuple[int, str]] = {}  # relative path -> (size, sha256 of its bytes)
    manifest = _check_manifest(folder, listing, digests)
    problems += manifest.problems
    problems += listing.problems

    total_bytes = sum(listing.files.values())
    over_limits = _limit_problems(listing, total_bytes, limits)
    problems += over_limits
    within_limits = not over_limits
    train = check_split(folder, "", listing, manifest, limits, digests, within_limits, required=True)
    val = check_split(folder, "val/", listing, manifest, limits, digests, within_limits, required=False)
    problems += train.problems + val.problems
    problems += _class_problems(manifest, train, val, within_limits, taught_names)

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
    return ValidationResult(_accepted(folder.name, manifest, sha256, train, val, total_bytes), [])


def _accepted(
    name: str, manifest: ParsedManifest, sha256: str, train: Split, val: Split, total_bytes: int
) -> ValidatedBatch:
    """What the daemon records about a batch without problems."""
    classes = manifest.classes or {}
    all_counts = train.counts + val.counts
    return ValidatedBatch(
        name=name,
        kind=manifest.kind,
        classes=dict(sorted(classes.items())),
        sha256=sha256,
        train_stems=train.stems,
        val_stems=val.stems,
        pixel_counts={value: int(all_counts[value]) for value in sorted(classes)},
        total_bytes=total_bytes,
    )


def _limit_problems(listing: Listing, total_bytes: int, limits: Limits) -> list[Problem]:
    """Too many files or too many bytes: past either, no file's contents are checked."""
    problems = []
    if listing.truncated:
        problems.append(
            Problem(
                ".",
                f"holds more than {limits.max_files} files and folders (contents were not checked)",
                f"split it into batches of at most {limits.max_files} files",
            )
        )
    if total_bytes > limits.max_batch_bytes:
        problems.append(
            Problem(
                ".",
                f"holds {_human_bytes(total_bytes)}, more than the limit of "
                f"{_human_bytes(limits.max_batch_bytes)} (contents were not checked)",
                "split it into smaller batches",
            )
        )
    return problems


def _class_problems(
    manifest: ParsedManifest, train: Split, val: Split, within_limits: bool, taught_names: Collection[str]
) -> list[Problem]:
    """Declared classes without pixels, and classes a training batch may not teach again."""
    problems = []
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
    return problems


def _check_manifest(folder: Path, listing: Listing, digests: dict[str, tuple[int, str]]) -> ParsedManifest:
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
        data = read_file(folder, MANIFEST, digests)
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


def _combined_hash(digests: dict[str, tuple[int, str]]) -> str:
    """One hash over the sorted relative paths and contents: independent of mtimes and the folder name."""
    combined = hashlib.sha256()
    for rel in sorted(digests):
        size, digest = digests[rel]
        combined.update(f"{rel}\0{size}\0{digest}\n".encode())
    return combined.hexdigest()


def _is_known(sha256: str, known_hashes: Callable[[str], bool] | Collection[str]) -> bool:
    return known_hashes(sha256) if callable(known_hashes) else sha256 in known_hashes


def _human_bytes(size: int) -> str:
    amount, unit = float(size), "bytes"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if amount < 1024:
            break
        amount, unit = amount / 1024, larger
    return f"{size} bytes" if unit == "bytes" else f"{amount:.1f} {unit}"
