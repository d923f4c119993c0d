"""The batch folder format (docs/product.md, "The batch folder"): its names, its manifest and its rules.

The one owner of the format: the daemon's validation (``ciss_daemon/batch/validation.py``) and the engine's
reader (``engine/data.py``) both parse ``batch.toml`` with :func:`parse_manifest`, so a manifest the
daemon accepts is one the engine reads the same way, and the reverse. Torch-free (standard library only):
the daemon validates on its fast path.

A folder::

    <name>/batch.toml                 kind = "train" | "eval", [classes] value = "name", optional [colors]
    <name>/images/<stem>.jpg|.png     RGB images
    <name>/masks/<stem>.png           8-bit masks: 0 background, 255 ignore, the declared values
    <name>/val/images/, val/masks/    optional held-out split
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MANIFEST = "batch.toml"
BATCH_KINDS = ("train", "eval")
MANIFEST_KEYS = ("kind", "classes", "colors")  # [colors]: display only (the report, predictions)
SPLITS = ("train", "val")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MASK_SUFFIX = ".png"
BACKGROUND = 0
IGNORE = 255

MANIFEST_EXAMPLE = 'e.g. kind = "train" and a [classes] table such as 1 = "bicycle"'
_CLASS_KEY = re.compile(r"-?[0-9]+")
_COLOUR = re.compile(r"#[0-9a-fA-F]{6}")
_MAX_LISTED_VALUES = 20


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a batch, and what the user should do about it."""

    file: str  # path relative to the batch folder, "batch.toml", or "." for the folder itself
    what: str
    todo: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what} — {self.todo}"


@dataclass(frozen=True)
class BatchManifest:
    """The parsed ``batch.toml`` of one batch folder."""

    name: str  # the folder name
    kind: str  # "train" or "eval"
    classes: dict[int, str]  # mask value (1..254) -> class name


@dataclass(frozen=True)
class ParsedManifest:
    """What :func:`parse_manifest` found: the kind, the classes it could read, and every problem."""

    kind: str
    classes: dict[int, str] | None  # None when [classes] is missing or unusable: value checks are skipped
    problems: list[Problem] = field(default_factory=list)


def parse_manifest(document: dict[str, Any]) -> ParsedManifest:
    """Check a decoded ``batch.toml`` against every rule of the format; never raises."""
    problems: list[Problem] = []
    unknown = sorted(set(document) - set(MANIFEST_KEYS))
    if unknown:
        what = f"has unknown key{'s' if len(unknown) > 1 else ''} {', '.join(map(quote, unknown))}"
        problems.append(
            Problem(MANIFEST, what, "remove it; batch.toml holds only kind, [classes] and [colors]")
        )
    kind = document.get("kind", "train")
    if kind not in BATCH_KINDS:
        todo = 'write kind = "train" or kind = "eval", or leave kind out for a training batch'
        problems.append(Problem(MANIFEST, f"kind = {toml_value(kind)} is not a batch kind", todo))
        kind = "train"
    table = document.get("classes")
    if table is None or not isinstance(table, dict) or not table:
        if table is None:
            what, todo = "has no [classes] table", f"declare the classes ({MANIFEST_EXAMPLE})"
        elif not isinstance(table, dict):
            what, todo = "classes is not a table", 'write it as [classes] then 1 = "bicycle"'
        else:
            what, todo = "[classes] declares no classes", 'add one line per class: 1 = "bicycle"'
        return ParsedManifest(kind, None, [*problems, Problem(MANIFEST, what, todo)])
    classes: dict[int, str] = {}
    for key, name in table.items():
        value = _class_value(key)
        if isinstance(value, Problem):
            problems.append(value)
        elif (problem := _class_name_problem(value, name)) is not None:
            problems.append(problem)
        else:
            classes[value] = name
    problems += _repeated_names(classes) + _colour_problems(document.get("colors", {}), classes)
    return ParsedManifest(kind, classes, problems)


def manifest_colours(folder: Path) -> dict[str, tuple[int, int, int]]:
    """Class name -> RGB from the [colors] table of a stored (validated) batch; {} without one."""
    try:
        document = tomllib.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return {}
    classes, colours = document.get("classes", {}), document.get("colors", {})
    if not isinstance(classes, dict) or not isinstance(colours, dict):
        return {}
    return {
        classes[key]: (int(value[1:3], 16), int(value[3:5], 16), int(value[5:7], 16))
        for key, value in colours.items()
        if key in classes and isinstance(value, str) and _COLOUR.fullmatch(value)
    }


def _class_value(key: str) -> int | Problem:
    """The mask value a [classes] key declares, or why it declares none."""
    if not _CLASS_KEY.fullmatch(key):
        todo = 'use the integer mask values 1 to 254 as keys, e.g. 1 = "bicycle"'
        return Problem(MANIFEST, f"[classes] key {quote(key)} is not a mask value", todo)
    value = int(key)
    if key != str(value):
        return Problem(MANIFEST, f"[classes] key {quote(key)} has leading zeros", f"write it as {value}")
    if value == BACKGROUND:
        return Problem(
            MANIFEST, "[classes] declares value 0, which is background", "remove it; 0 is always background"
        )
    if value == IGNORE:
        return Problem(
            MANIFEST, "[classes] declares value 255, which means ignore", "remove it; 255 always means ignore"
        )
    if not BACKGROUND < value < IGNORE:
        return Problem(
            MANIFEST, f"[classes] declares value {value}, outside the 8-bit mask range", "use values 1 to 254"
        )
    return value


def _class_name_problem(value: int, name: object) -> Problem | None:
    if not isinstance(name, str):
        what = f"the class name for value {value} is not a string (it is {toml_value(name)})"
        return Problem(MANIFEST, what, f'write the name in quotes, e.g. {value} = "bicycle"')
    if not name.strip():
        return Problem(
            MANIFEST, f"value {value} has an empty class name", f'give it a name, e.g. {value} = "bicycle"'
        )
    if name != name.strip() or not name.isprintable():
        what = f"the class name {name!r} for value {value} has spaces at its ends or control characters"
        return Problem(MANIFEST, what, "write the name without them")
    return None


def _repeated_names(classes: dict[int, str]) -> list[Problem]:
    values_by_name: dict[str, list[int]] = {}
    for value, name in classes.items():
        values_by_name.setdefault(name, []).append(value)
    todo = "a class appears once per batch: give each value its own name, or relabel to one value"
    return [
        Problem(MANIFEST, f'class name "{name}" is given to values {join_values(values)}', todo)
        for name, values in values_by_name.items()
        if len(values) > 1
    ]


def _colour_problems(table: Any, classes: dict[int, str]) -> list[Problem]:
    """What is wrong with the optional [colors] table: mask value -> "#rrggbb" of a declared class."""
    todo = 'write [colors] then one line per class, e.g. 1 = "#ff8800"'
    if not isinstance(table, dict):
        return [Problem(MANIFEST, "colors is not a table", todo)]
    problems = []
    for key, colour in table.items():
        if not _CLASS_KEY.fullmatch(key) or int(key) not in classes:
            problems.append(
                Problem(MANIFEST, f"[colors] key {quote(key)} is not a value declared in [classes]", todo)
            )
        elif not isinstance(colour, str) or not _COLOUR.fullmatch(colour):
            problems.append(Problem(MANIFEST, f"[colors] {key} = {toml_value(colour)} is not a colour", todo))
    return problems


def join_values(values: list[int]) -> str:
    """ "1, 2, 3" with at most 20 values, then "and N more"."""
    shown = ", ".join(map(str, values[:_MAX_LISTED_VALUES]))
    if len(values) > _MAX_LISTED_VALUES:
        shown += f" and {len(values) - _MAX_LISTED_VALUES} more"
    return shown


def quote(text: str) -> str:
    """A name as the user wrote it, in double quotes, or its repr when it holds unprintable characters."""
    return repr(text) if not text.isprintable() else f'"{text}"'


def toml_value(value: object) -> str:
    """A decoded TOML value written back as TOML would show it."""
    if isinstance(value, str):
        return quote(value)
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)
