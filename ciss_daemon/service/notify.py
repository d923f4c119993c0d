"""``[notify]``: a JSON POST to each webhook when a step is promoted, held or failed, or a batch is rejected.

The daemon's loop only puts events on a queue (:meth:`Notifier.send` never waits); one background thread
posts them, each with a timeout and a few retries, so a webhook that is down or slow never holds up
training or the inbox. The body is what Slack-compatible incoming webhooks accept: a ``text`` line (also
understood by Mattermost, Rocket.Chat and Teams' Slack-compatible endpoints), with the event's fields under
``ciss`` for other receivers.

Events come from the catalog's event log, which the daemon writes for every outcome: :func:`new_events`
reads those committed after a cursor, so a notification is never sent for a change that was rolled back.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ciss_daemon.catalog.tables import Event, Step
from ciss_daemon.settings import NotifySettings

log = logging.getLogger("ciss.notify")

# Events waiting to be posted; past this many (every webhook down for a long time) new ones are dropped.
QUEUE_SIZE = 1000
ICONS = {"promoted": ":white_check_mark:", "held": ":raised_hand:", "failed": ":x:", "rejected": ":warning:"}
TITLES = {
    "promoted": "model promoted",
    "held": "step held for the operator",
    "failed": "step failed",
    "rejected": "batch rejected",
}


def last_event_id(*, session: Session) -> int:
    """The newest event's id (0 when none): where a notifier starts, so old events are not sent again."""
    return session.scalar(select(func.max(Event.id))) or 0


def new_events(*, session: Session, after: int, kinds: Sequence[str]) -> list[dict[str, Any]]:
    """Events of ``kinds`` with an id above ``after``, oldest first, as notification fields."""
    rows = session.execute(
        select(Event, Step.index)
        .outerjoin(Step, Event.step_id == Step.id)
        .where(Event.id > after, Event.kind.in_(kinds))
        .order_by(Event.id)
    )
    return [
        {
            "id": e.id,
            "event": e.kind,
            "level": e.level,
            "step": index,
            "at": e.at.isoformat(),
            "message": e.message,
        }
        for e, index in rows
    ]


def message(event: dict[str, Any], *, workspace: str) -> dict[str, Any]:
    """The JSON body of one notification: Slack's ``text`` plus the event's fields under ``ciss``."""
    kind = event["event"]
    text = f"{ICONS.get(kind, '')} ciss {TITLES.get(kind, kind)}: {event['message']} ({workspace})".strip()
    return {"text": text, "ciss": {**{k: v for k, v in event.items() if k != "id"}, "workspace": workspace}}


def post(url: str, body: dict[str, Any], *, timeout: float) -> None:
    """One POST of ``body`` as JSON; raises ``OSError`` (``urllib.error.URLError``) unless answered 2xx."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body).encode("utf-8"),
        headers={"Content-Type": "application/json", "User-Agent": "ciss"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - http(s) only (settings)
        response.read()


def deliver(
    url: str,
    body: dict[str, Any],
    *,
    timeout: float,
    retries: int,
    retry_seconds: float,
    sleep: Callable[[float], None] = time.sleep,
) -> bool:
    """Post ``body`` to ``url``, retrying ``retries`` times with doubling pauses; True once answered 2xx."""
    pause = retry_seconds
    for attempt in range(retries + 1):
        try:
            post(url, body, timeout=timeout)
            return True
        except (OSError, ValueError) as error:  # URLError, HTTPError, timeouts, a refused connection
            last = error
        if attempt < retries:
            sleep(pause)
            pause *= 2
    log.warning("webhook %s failed after %d tries (%s); event dropped", _safe_url(url), retries + 1, last)
    return False


def _safe_url(url: str) -> str:
    """The URL without its path: Slack's webhook paths are secrets and must not reach the log."""
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}/..."


class Notifier:
    """Posts notifications from a background thread; ``send`` only queues."""

    def __init__(
        self,
        settings: NotifySettings,
        *,
        workspace: str,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.workspace = workspace
        self.sleep = sleep
        self.queue: queue.Queue[dict[str, Any] | None] = queue.Queue(QUEUE_SIZE)
        self.delivered = 0
        self.failed = 0
        self.thread = threading.Thread(target=self._run, name="ciss-notify", daemon=True)
        self.thread.start()

    def send(self, event: dict[str, Any]) -> None:
        """Queue one event for every webhook; never blocks (drops it, with a warning, when full)."""
        try:
            self.queue.put_nowait(event)
        except queue.Full:
            log.warning("notification queue full (%d); dropped: %s", QUEUE_SIZE, event.get("message"))

    def close(self, timeout: float = 2.0) -> None:
        """Stop after what is queued, waiting at most ``timeout`` s (the thread dies with the process)."""
        try:
            self.queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self.thread.join(timeout)

    def _run(self) -> None:
        s = self.settings
        while (event := self.queue.get()) is not None:
            body = message(event, workspace=self.workspace)
            for url in s.webhooks:
                ok = deliver(
                    url,
                    body,
                    timeout=s.timeout_seconds,
                    retries=s.retries,
                    retry_seconds=s.retry_seconds,
                    sleep=self.sleep,
                )
                if ok:
                    self.delivered += 1
                else:
                    self.failed += 1
            self.queue.task_done()
