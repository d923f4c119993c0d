"""A workspace the user may not write: each writing command says so in one line, with the path and fix."""

from __future__ import annotations

import errno
import os
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from batchmaker import make_batch
from typer.testing import CliRunner

from ciss_daemon.catalog import plain
from ciss_daemon.cli import app
from ciss_daemon.workspace import _user_name

runner = CliRunner()
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def _refuse_writes(monkeypatch: pytest.MonkeyPatch, root: Path, code: int) -> None:
    """Make ``root`` behave as a read-only file system (EROFS) or a folder of another user (EACCES).

    Root may write anywhere, so permissions cannot be tested with chmod here: the refusal is made where
    the kernel would make it, at the os calls that open for writing or create folders.
    """
    real_open, real_mkdir = os.open, os.mkdir

    def inside(path: Any) -> bool:
        return Path(os.fsdecode(path)).resolve().is_relative_to(root)

    def fake_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & _WRITE and inside(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        return real_open(path, flags, *args, **kwargs)

    def fake_mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if inside(path):
            raise OSError(code, os.strerror(code), os.fsdecode(path))
        real_mkdir(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "mkdir", fake_mkdir)


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    assert runner.invoke(app, ["init", str(tmp_path / "ws"), "--profile", "cpu"]).exit_code == 0
    return (tmp_path / "ws").resolve()


@pytest.mark.parametrize("command", ["daemon", "promote", "rollback v0001", "discard", "submit"])
def test_a_read_only_workspace_is_one_line_naming_the_path_and_the_fix(
    workspace: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    batch = make_batch(tmp_path / "batches")
    lock = workspace / "daemon.lock"
    lock.unlink(missing_ok=True)
    _refuse_writes(monkeypatch, workspace, errno.EROFS)
    args = [*command.split(), *([str(batch)] if command == "submit" else []), "-w", str(workspace)]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    path = workspace / "inbox" if command == "submit" else lock
    line = (
        f"cannot write {path}: the file system is read-only; remount it read-write or use a workspace on a "
        "writable disk"
    )
    # The daemon logs it (one timed log line); the other commands print it as their error.
    assert len(result.output.splitlines()) == 1 and "Traceback" not in result.output
    assert result.output.rstrip().endswith(line)


def test_a_workspace_of_another_user_names_its_owner(
    workspace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    lock = workspace / "daemon.lock"
    lock.unlink(missing_ok=True)
    _refuse_writes(monkeypatch, workspace, errno.EACCES)
    monkeypatch.setattr(os, "geteuid", lambda: 65534)  # the workspace belongs to the user running the tests
    me, owner = _user_name(65534), _user_name(workspace.stat().st_uid)
    result = runner.invoke(app, ["promote", "-w", str(workspace)])
    assert result.output == (
        f"Error: cannot write {lock}: permission denied for {me}; run the command as its owner "
        f"(`sudo -u {owner} ciss ...`) or give {me} write access\n"
    )


def test_a_reader_that_cannot_write_survives_the_wal_files_vanishing_as_it_opens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The owner's last connection removes -wal and -shm between the reader's look and its first read: the
    # read-through-WAL open then fails, and the reader opens the file alone, which holds every commit.
    path = tmp_path / "catalog.sqlite"
    with closing(sqlite3.connect(path)) as owner:
        owner.execute("PRAGMA journal_mode = WAL")
        owner.execute("CREATE TABLE steps (id INTEGER)")
        owner.execute("INSERT INTO steps VALUES (7)")
        owner.commit()
    wal = path.with_name(path.name + "-wal")
    wal.write_bytes(b"")
    real_connect = sqlite3.connect

    class CannotInitialise:  # what a read-only reader meets when -shm is missing and it cannot create it
        def execute(self, *_: Any) -> None:
            raise sqlite3.OperationalError("attempt to write a readonly database")

        def close(self) -> None:
            pass

    def connect(database: str, **kwargs: Any) -> Any:
        if "immutable" not in database:
            wal.unlink()  # the owner's status ended as the reader opened
            return CannotInitialise()
        return real_connect(database, **kwargs)

    monkeypatch.setattr(plain.sqlite3, "connect", connect)
    with closing(plain.open_read_only(path)) as reader:
        assert reader.execute("SELECT id FROM steps").fetchall() == [(7,)]
