"""What ``ciss status`` shows: the catalog's snapshot, whether a daemon runs, and why the queue waits.

Imports nothing heavy (no SQLAlchemy, no rich, never torch): the command line reads the catalog with plain
SQL (``catalog/plain.py``) and answers in a fraction of a second; ``views.py`` draws the screen.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from ciss_daemon.catalog.plain import Reader
from ciss_daemon.catalog.snapshot import status_snapshot
from ciss_daemon.catalog.states import SETTLED_STATES
from ciss_daemon.service.window import next_opening, training_window
from ciss_daemon.settings import Settings
from ciss_daemon.workspace import Workspace, daemon_alive, read_pid


def snapshot(
    ws: Workspace,
    read: Reader,
    *,
    settings: Settings | None = None,
    now: dt.datetime | None = None,
) -> dict[str, Any]:
    """The catalog's snapshot (read through ``read``) plus whether a daemon holds the workspace and why
    the queue waits.

    ``settings`` (for the training window) may be None when ``ciss.toml`` does not load: the window is
    then not judged. A queued step's note is why it waits now, not what ended its last attempt.
    """
    data = status_snapshot(read)
    alive = daemon_alive(ws.lock_path)
    data["daemon"] = {"alive": alive, "pid": read_pid(ws.lock_path) if alive else None}
    data["workspace"] = str(ws.root)
    window = settings.daemon.training_window if settings is not None else ""
    data["waiting"] = wait_reason(data, ws, window, dt.datetime.now(dt.UTC) if now is None else now)
    for step in data["steps"]:
        if step["state"] == "queued" and data["waiting"]:
            # What ended the last attempt ("killed by SIGKILL") is history, kept apart from the note.
            step["last_attempt"], step["reason"] = step["reason"], data["waiting"]
    return data


def wait_reason(data: dict[str, Any], ws: Workspace, window: str, now: dt.datetime) -> str | None:
    """Why the queued steps do not train yet, in words; None when nothing is queued or one trains."""
    if not data["queue"] or data["running"]:
        return None
    first = data["queue"][0]["step"]
    blocking = next(
        (st for st in data["steps"] if st["index"] < first and st["state"] not in SETTLED_STATES),
        None,
    )
    if blocking is not None and blocking["state"] == "held":
        i = blocking["index"]
        return f"waits for held step {i}: `ciss promote {i}` or `ciss discard {i}` lets the queue go on"
    if blocking is not None:
        return f"waits for step {blocking['index']} ({blocking['state']})"
    if not data["daemon"]["alive"]:
        return f"waits for the daemon, which is not running: start it with `ciss daemon -w {ws.root}`"
    opening = next_opening(training_window(window), now)
    if opening is not None:
        when = "never" if opening.year == dt.MAXYEAR else opening.astimezone().strftime("%Y-%m-%d %H:%M")
        return f"waits for the training window {window!r} (UTC), which opens next at {when}"
    return "starts at the daemon's next check"
