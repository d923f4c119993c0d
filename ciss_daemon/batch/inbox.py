"""The inbox: when a dropped folder is complete, how `ciss submit` hands one in, and where folders go after.

A folder is complete when batch.toml exists and nothing in it changed for `settle_seconds` (the clock is
passed in, so tests never sleep). Nothing a user dropped is ever deleted: an accepted folder is copied into
the store and the original moves to the archive; a rejected one moves to rejected/ with a REJECTED.txt.
Watcher events only wake the daemon early; it rescans on its own, so a lost event loses nothing.
"""

import os
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from ciss_daemon.batch.listing import printable
from ciss_daemon.exceptions import SubmitError, WorkspaceError
from ciss_daemon.workspace import cannot_write
from engine.atomic import fsync_dir, fsync_tree, write_text
from engine.batch_format import MANIFEST, Problem

STAGING = ".staging"
REJECTION_REPORT = "REJECTED.txt"

Signature = tuple[tuple[str, int, int], ...]  # (relative path, size, mtime_ns) per entry, sorted

# Reading a file (as validation does) raises these; they change nothing, so they must not wake the daemon.
_READ_ONLY_EVENTS = frozenset({"opened", "closed_no_write"})


SUBMITTED_MARKER = ".ciss-submitted"  # in a folder `ciss submit` renamed in whole: no need to settle


def folder_signature(folder: Path) -> Signature:
    """(relative path, size, mtime_ns) of every entry under `folder` (lstat), sorted; () when it is gone."""
    entries = []
    pending = [""]
    while pending:
        rel_dir = pending.pop()
        try:
            with os.scandir(os.path.join(folder, rel_dir)) as scan:
                for entry in scan:
                    rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except OSError:
                        continue  # removed while listing: the next look sees the change
                    entries.append((rel, info.st_size, info.st_mtime_ns))
                    if stat.S_ISDIR(info.st_mode):
                        pending.append(rel)
        except OSError:
            continue  # unreadable or gone; validation reports an unreadable folder
    return tuple(sorted(entries))


class CompletenessTracker:
    """Remembers each inbox folder's signature and when it last changed."""

    def __init__(self, settle_seconds: float) -> None:
        self.settle_seconds = settle_seconds
        self._seen: dict[
            Path, tuple[Signature, datetime]
        ] = {}  # folder -> (signature, time it was last seen changing)

    def observe(self, folder: Path, now: datetime) -> bool:
        """Look at `folder` at time `now`; True when batch.toml exists and nothing changed for settle_seconds.

        A folder first seen counts as changing at that moment, so after a restart it settles again.
        """
        signature = folder_signature(folder)
        seen = self._seen.get(folder)
        if seen is None or seen[0] != signature:
            self._seen[folder] = (signature, now)
            changed_at = now
        else:
            changed_at = seen[1]
        has_manifest = any(rel == MANIFEST for rel, _, _ in signature)
        return has_manifest and now - changed_at >= timedelta(seconds=self.settle_seconds)

    def forget(self, folder: Path) -> None:
        """Drop what is known of `folder` (it was accepted or rejected, or is gone)."""
        self._seen.pop(folder, None)

    def prune(self, keep: Collection[Path]) -> None:
        """Forget every folder not in `keep`: those that left the inbox some other way."""
        for folder in set(self._seen) - set(keep):
            del self._seen[folder]


def candidate_folders(inbox: Path) -> list[Path]:
    """The inbox's direct subfolders, sorted by name; hidden ones (.staging) and plain files are skipped.

    A link to a folder is a candidate, so that validation rejects it with a report rather than leaving it
    unexplained.
    """
    try:
        with os.scandir(inbox) as scan:
            names = [entry.name for entry in scan if not entry.name.startswith(".") and entry.is_dir()]
    except FileNotFoundError:
        raise WorkspaceError(
            f"the inbox {inbox} is missing; run `ciss init` to create the workspace"
        ) from None
    return [inbox / name for name in sorted(names)]


def submit_folder(source: Path, inbox: Path) -> Path:
    """Copy the batch folder `source` into the inbox so that it appears whole at once; return its inbox path.

    The copy is made in a hidden staging folder inside the inbox (same file system), synced to disk, then
    renamed in. Links are copied as links, never followed, so validation sees and rejects them. The copy
    carries a ``SUBMITTED_MARKER`` file, which tells the daemon it need not wait for the folder to settle.
    """
    # abspath resolves "." and ".." without following links, so the batch is named after the folder itself.
    source = Path(os.path.abspath(source))
    name = source.name
    if not source.exists():
        raise SubmitError(f"{source} does not exist; give the path of a batch folder")
    if not source.is_dir():
        raise SubmitError(
            f"{source} is not a folder; a batch is a folder holding batch.toml, images/ and masks/"
        )
    if not (source / MANIFEST).is_file():
        raise SubmitError(
            f"{source} has no batch.toml; write the manifest with its [classes] table, then submit"
        )
    if name.startswith("."):
        raise SubmitError(
            f"the folder name {name} starts with a dot, which the inbox ignores; rename the folder"
        )
    if not inbox.is_dir():
        raise SubmitError(f"there is no inbox at {inbox}; run `ciss init` to create the workspace")
    if inbox.resolve().is_relative_to(source.resolve()):
        raise SubmitError(f"{source} contains the inbox itself; submit the batch folder, not the workspace")
    target = inbox / name
    if os.path.lexists(target):
        raise SubmitError(f"a batch named {name} is already in the inbox; rename the folder or wait")
    staging_root = inbox / STAGING
    try:
        staging_root.mkdir(exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f"{name}.", dir=staging_root))
    except OSError as exc:
        # Name the inbox the user knows, not the random staging folder that could not be made.
        raise cannot_write(OSError(exc.errno, exc.strerror, str(inbox))) or SubmitError(
            f"could not copy {source} into the inbox ({exc}); check the free space and permissions"
        ) from None
    try:
        # copytree ends with copystat, so the folder gets the source's permissions, not mkdtemp's 0700.
        shutil.copytree(source, staging, symlinks=True, dirs_exist_ok=True)
        (staging / SUBMITTED_MARKER).touch()
        fsync_tree(staging)
        os.rename(staging, target)
        fsync_dir(inbox)
    except BaseException as exc:
        shutil.rmtree(staging, ignore_errors=True)  # only our own partial copy
        if isinstance(exc, OSError):
            raise SubmitError(
                f"could not copy {source} into the inbox ({exc}); check the free space and permissions"
            ) from exc
        raise
    return target


def store_folder(folder: Path, *, store: Path, sha256: str) -> Path:
    """Copy `folder` into `store/<name>-<sha8>/` (temporary name, synced, renamed); returns the copy.

    The daemon records the batch after this and only then archives the original (`archive_folder`), so
    that a crash in between leaves the original in the inbox, never a batch that is neither in the inbox
    nor in the catalog.
    """
    name = folder.name
    store.mkdir(parents=True, exist_ok=True)
    copy = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=store))
    try:
        shutil.copytree(folder, copy, symlinks=True, dirs_exist_ok=True)
        fsync_tree(copy)
        stored = _free_path(store, f"{name}-{sha256[:8]}")
        os.rename(copy, stored)
        fsync_dir(store)
    except BaseException:
        shutil.rmtree(copy, ignore_errors=True)  # only our own partial copy; the original is untouched
        raise
    return stored


def archive_folder(folder: Path, *, archive: Path, now: datetime) -> Path:
    """Move the original of an accepted batch to `archive/<name>-<UTC time>/`; returns where it went."""
    archive.mkdir(parents=True, exist_ok=True)
    archived = _free_path(archive, f"{folder.name}-{_utc_stamp(now)}")
    shutil.move(folder, archived)
    fsync_dir(archive)
    return archived


def reject_folder(folder: Path, *, rejected: Path, problems: Sequence[Problem], now: datetime) -> Path:
    """Move `folder` to `rejected/<name>/` (or `<name>-<UTC time>/` when taken) with a REJECTED.txt inside.

    A link dropped in place of a folder is moved, as a link, into a new folder beside its report, so the
    report is never written through the link.
    """
    name = folder.name
    rejected.mkdir(parents=True, exist_ok=True)
    destination = rejected / name
    if os.path.lexists(destination):
        destination = _free_path(rejected, f"{name}-{_utc_stamp(now)}")
    if folder.is_symlink() or not folder.is_dir():
        destination.mkdir()
        shutil.move(folder, destination / name)
    else:
        shutil.move(folder, destination)
    # Folder names may hold undecodable bytes (surrogate escapes); the report must still be written.
    write_text(
        destination / REJECTION_REPORT, rejection_report(name, problems, now), errors="backslashreplace"
    )
    fsync_dir(rejected)
    return destination


def rejection_report(name: str, problems: Sequence[Problem], now: datetime | None) -> str:
    """REJECTED.txt's text: when, every problem (file, what is wrong, what to do), and how to resubmit.

    ``now`` None: what ``ciss check`` prints, the report the batch would get if it were submitted.
    """
    count = f"{len(problems)} problem{'s' if len(problems) != 1 else ''}"
    if now is None:
        verdict = "would be rejected"
    else:
        verdict = f"was rejected on {_as_utc(now).strftime('%Y-%m-%d at %H:%M:%S UTC')}"
    lines = [f'Batch "{printable(name)}" {verdict}, because of {count}:', ""]
    for number, problem in enumerate(problems, start=1):
        lines.append(f"{number}. {problem.file}: {problem.what}")
        lines.append(f"   What to do: {problem.todo}")
    lines += [
        "",
        "To resubmit: fix every problem above in this folder, then move the folder back into the inbox",
        "(or run `ciss submit` on it). You may delete this REJECTED.txt first; it is ignored either way.",
    ]
    return "\n".join(lines) + "\n"


class _SetOnChange(FileSystemEventHandler):
    def __init__(self, changed: threading.Event, on_change: Callable[[], None] | None) -> None:
        self._changed = changed
        self._on_change = on_change

    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.event_type not in _READ_ONLY_EVENTS:
            self._changed.set()
            if self._on_change is not None:
                self._on_change()


class InboxWatcher:
    """Sets `changed` when an entry of the inbox itself appears, goes or changes.

    Only the top level is watched: a new folder is the news; the daemon then re-examines folders that
    have not settled at every iteration, so a recursive watch (one inotify watch per subfolder, staging
    copies included) would only add load.
    """

    def __init__(self, inbox: Path, on_change: Callable[[], None] | None = None) -> None:
        self.inbox = inbox
        self.changed = threading.Event()
        self._on_change = on_change  # e.g. the daemon's wake-up, so a new folder is seen at once
        self._observer: BaseObserver | None = None

    def start(self) -> None:
        if self._observer is not None:
            return
        observer = Observer()
        observer.daemon = True  # never keeps the process alive on its own
        observer.schedule(_SetOnChange(self.changed, self._on_change), str(self.inbox), recursive=False)
        observer.start()
        self._observer = observer

    def stop(self) -> None:
        if self._observer is None:
            return
        self._observer.stop()
        self._observer.join(timeout=5)
        self._observer = None


def _free_path(parent: Path, base: str) -> Path:
    """`parent/base`, or `parent/base-2`, `-3`, ...: the first that does not exist."""
    path, number = parent / base, 2
    while os.path.lexists(path):
        path, number = parent / f"{base}-{number}", number + 1
    return path


def _as_utc(now: datetime) -> datetime:
    # A naive time is taken to be UTC already, never local time.
    return now.replace(tzinfo=UTC) if now.tzinfo is None else now.astimezone(UTC)


def _utc_stamp(now: datetime) -> str:
    return _as_utc(now).strftime("%Y%m%dT%H%M%SZ")
