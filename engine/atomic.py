"""Atomic, durable file writes: the one place that writes a file so readers and crashes see it whole.

Every write goes to a temporary ``.<name>.<random>.tmp`` in the same folder, is fsynced, renamed over the
target, and the folder is fsynced so that the rename itself survives a power cut. On failure the temporary
file is removed and the target is left as it was. Standard library only: the daemon's torch-free paths
(the inbox, promotion, operator requests) and the engine's checkpoints use it alike.
"""

from __future__ import annotations

import json
import os
import stat
import uuid
from pathlib import Path
from typing import Any


def write_bytes(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data``; readers and crashes see the old content or the new, whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # os.open with mode 0o666 lets the umask decide permissions, as a plain open() would.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text(path: Path, text: str, *, errors: str = "strict") -> None:
    """:func:`write_bytes` of ``text`` in UTF-8 (``errors`` as for ``str.encode``)."""
    write_bytes(path, text.encode("utf-8", errors=errors))


def write_json(path: Path, data: Any) -> None:
    """:func:`write_bytes` of ``data`` as JSON; NaN and infinities are refused (JSON has none)."""
    write_bytes(path, json.dumps(data, indent=1, allow_nan=False).encode("utf-8"))


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries, making a rename into it durable."""
    # Folders cannot be opened for fsync on Windows; there, the rename is as durable as it gets.
    if os.name == "nt":
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every regular file and folder under ``root``, so a rename after it publishes whole data."""
    for dirpath, _, filenames in os.walk(root, followlinks=False):
        for filename in filenames:
            path = os.path.join(dirpath, filename)
            if stat.S_ISREG(os.lstat(path).st_mode):
                fsync_file(path)
        fsync_file(dirpath)


def fsync_file(path: str | Path) -> None:
    """Flush one file (or folder) without following a symbolic link."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
