"""The service's clock: the wall time, read once per iteration of the daemon's loop as an aware UTC datetime.

``now()`` is the one reading; the loop passes what it read down as ``now`` to intake, training, recovery,
operator actions and the catalog, so one iteration records one time everywhere, and tests drive the loop
with a clock of their own (``Daemon(clock=...)``) instead of sleeping. Waits that only bound how long
something may take (stop timeouts, polling deadlines) use ``time.monotonic()`` instead, on purpose: a
deadline must not move when the wall clock is set back or forward, and it is never stored or shown.
"""

from __future__ import annotations

import datetime as dt


def now() -> dt.datetime:
    """The wall time now, as the aware UTC time the catalog stores."""
    return dt.datetime.now(dt.UTC)
