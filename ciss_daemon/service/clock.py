"""The service's clock: the loop passes ``now`` as seconds since the epoch; the catalog stores aware UTC."""

from __future__ import annotations

import datetime as dt


def utc(now: float) -> dt.datetime:
    """``now`` (seconds since the epoch) as the aware UTC time the catalog stores."""
    return dt.datetime.fromtimestamp(now, dt.UTC)
