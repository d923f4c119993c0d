"""The event log: the history ``ciss status`` shows and the notifications are read from.

Like every record function this takes an open ``session`` and never commits.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from ciss_daemon.catalog.tables import EVENT_LEVELS, Event, Step, utcnow


def log_event(
    *,
    session: Session,
    kind: str,
    message: str,
    level: str = "info",
    step: Step | None = None,
    now: dt.datetime | None = None,
) -> Event:
    """Add one line to the history ``ciss status`` shows."""
    if level not in EVENT_LEVELS:
        raise ValueError(f"event level {level!r} is not one of {', '.join(EVENT_LEVELS)}")
    event_row = Event(
        at=now or utcnow(), level=level, kind=kind, message=message, step_id=step.id if step else None
    )
    session.add(event_row)
    session.flush()
    return event_row
