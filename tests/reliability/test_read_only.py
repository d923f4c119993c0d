"""A workspace the user may not write: each writing command says so in one line, with the path and fix."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
from batchmaker import make_batch
from typer.testing import CliRunner

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
