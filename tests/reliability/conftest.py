"""Fixtures of the inbox tests: a workspace whose daemon settles folders for SETTLE seconds, never trains and
takes at most 40 files of 512 pixels a side per batch; a clock on an ordinary afternoon; the ``Daemon``
started in-process on both (see tests/helpers/inbox_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import FakeClock, in_process_daemon
from inbox_helpers import AFTERNOON, SETTLE, never_training_workspace

from ciss_daemon.workspace import Workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    return never_training_workspace(
        tmp_path / "ws",
        daemon__settle_seconds=SETTLE,
        daemon__rescan_seconds=3600.0,  # in-process tests flag rescans by hand
        limits__max_files=40,
        limits__max_image_side=512,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(AFTERNOON)


@pytest.fixture
def daemon(ws: Workspace, clock: FakeClock) -> Iterator:
    d = in_process_daemon(ws, clock)
    yield d
    d.shutdown()
