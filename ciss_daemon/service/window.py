"""The training window: a cron expression (UTC) of the minutes in which a queued step may start training.

Kept apart from the planning of jobs so that ``ciss status`` can say when the window opens without
importing the catalog's ORM; APScheduler is imported only when a window is set.
"""

from __future__ import annotations

import datetime as dt
from typing import Any


def training_window(expression: str) -> Any:
    """The cron trigger of ``daemon.training_window`` (in UTC), or None when training may start any time."""
    if not expression:
        return None
    from apscheduler.triggers.cron import CronTrigger

    return CronTrigger.from_crontab(expression, timezone=dt.UTC)


def next_opening(window: Any, now: dt.datetime) -> dt.datetime | None:
    """None when the training window is open at ``now`` (or there is none); else when it opens next (UTC).

    The window is a set of whole minutes: it is open when the trigger fires in the current minute.
    """
    if window is None:
        return None
    minute = now.astimezone(dt.UTC).replace(second=0, microsecond=0)
    fire = window.get_next_fire_time(None, minute)
    if fire is not None and fire <= minute:
        return None
    # Never: a window such as Feb 30th; far enough to read as "never" and still a datetime.
    return fire or dt.datetime.max.replace(tzinfo=dt.UTC)
