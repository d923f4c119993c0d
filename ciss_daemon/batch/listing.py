"""Walk a batch folder without following links, and say which of its names, links and files are refused.

The walk is iterative and lazy and stops after a set number of entries, so neither a deep tree nor a folder
of millions of files can exhaust the stack or the memory; what it finds is a :class:`Listing` that the
checks of the manifest and of each split read instead of the disk. Every name shown in a problem goes
through :func:`printable`, whatever bytes it holds.
"""

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from engine.batch_format import Problem


def printable(path: str) -> str:
    """`path` as printable text whatever bytes it holds (undecodable bytes and control characters escaped)."""
    text = os.fsencode(path).decode("utf-8", "backslashreplace")
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in text)


@dataclass
class Listing:
    """What a walk of the batch folder found, links and special files excluded."""

    files: dict[str, int] = field(default_factory=dict)  # relative path -> size in bytes
    dirs: set[str] = field(default_factory=set)
    problems: list[Problem] = field(default_factory=list)
    entries: int = 0
    truncated: bool = False  # stopped early: more entries than max_files


def folder_problem(folder: Path) -> Problem | None:
    """Why `folder` itself cannot be a batch (missing, a link, not a folder), or None."""
    try:
        mode = os.lstat(folder).st_mode
    except OSError as exc:
        return Problem(".", f"cannot be read ({exc.strerror})", "check that the batch folder exists")
    if stat.S_ISLNK(mode):
        return Problem(".", "is a symbolic link", "put the folder itself in the inbox, not a link to it")
    if not stat.S_ISDIR(mode):
        return Problem(".", "is not a folder", "a batch is a folder holding batch.toml, images/ and masks/")
    return None


def list_folder(folder: Path, max_files: int) -> Listing:
    """Walk `folder` without following links, stopping after `max_files` entries.

    Iterative, so depth cannot exhaust the stack; lazy, so a folder of millions of files costs little.
    """
    listing = Listing()
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
    why = name_problem(entry.name)
    if why is not None:
        return Problem(printable(rel), f"its name {why}", "rename it using printable UTF-8 characters")
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


def name_problem(name: str) -> str | None:
    """Why a file name cannot be recorded or printed, or None when it can."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        # os.scandir hands undecodable bytes back as surrogate escapes; show the raw bytes.
        return f"is not valid UTF-8 ({os.fsencode(name)!r})"
    if not name.isprintable():
        return f"contains control characters ({name!r})"
    return None
