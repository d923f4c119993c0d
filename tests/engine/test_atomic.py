"""engine/atomic.py: every write is whole or absent, and always reaches the disk (file and folder)."""

import json
import os
from pathlib import Path

import pytest

from engine import atomic


def test_write_json_replaces_the_file_and_fsyncs_file_and_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    target = tmp_path / "result.json"
    target.write_text("old")
    atomic.write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}
    assert synced[0].startswith(str(tmp_path / ".result.json.")) and synced[1] == str(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["result.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    target = tmp_path / "progress.json"
    target.write_text("old")
    with pytest.raises(ValueError):
        atomic.write_json(target, {"loss": float("nan")})  # JSON has no NaN
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["progress.json"]


def test_write_text_keeps_undecodable_names_readable(tmp_path: Path) -> None:
    atomic.write_text(tmp_path / "REJECTED.txt", "bad\udcff name", errors="backslashreplace")
    assert (tmp_path / "REJECTED.txt").read_text() == "bad\\udcff name"
