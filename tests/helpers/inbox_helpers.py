"""The inbox tests' daemon: in-process with a clock moved by hand, a training window that never opens, and
what it accepted and rejected. Import as `from inbox_helpers import ...` (pytest puts tests/helpers on
sys.path); the fixtures built on it are in tests/reliability/conftest.py.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from daemon_helpers import FakeClock, catalog_rows, new_workspace, settings_text

from ciss_daemon.workspace import Workspace

NEVER = "0 0 29 2 *"  # a training window that opens only at 00:00 on 29 February
SETTLE = 5.0
# An ordinary afternoon (2026-09-21 14:13:20 UTC): the window is shut, as every minute but 29 February 00:00.
AFTERNOON = dt.datetime(2026, 9, 21, 14, 13, 20, tzinfo=dt.UTC)


def never_training_workspace(root: Path, **overrides: Any) -> Workspace:
    """A workspace with tiny settings and ``overrides`` (``section__key=value``) whose training window never
    opens, so that accepted batches stay queued."""
    return new_workspace(root, settings_text(daemon__training_window=NEVER, **overrides))


def accepted_names(ws: Workspace) -> list[str]:
    return [row[0] for row in catalog_rows(ws, "SELECT name FROM batches ORDER BY id")]


def rejections(ws: Workspace) -> dict[str, list[str]]:
    return {
        name: json.loads(reasons)
        for name, reasons in catalog_rows(ws, "SELECT batch_name, reasons FROM rejections")
    }


def settle(daemon: Any, clock: FakeClock, rounds: int = 2) -> None:
    """Rescan, then tick until folders present now have settled (each first sighting counts as a change)."""
    daemon._flag_rescan()
    for _ in range(rounds):
        daemon.tick(clock.now)
        clock.advance(SETTLE + 0.1)
    daemon.tick(clock.now)
