"""The catalog as `ciss status` and the dashboard show it: one snapshot of steps, jobs and models.

Six plain SQL queries through a :data:`~ciss_daemon.catalog.plain.Reader`, so that the command line
reads them without SQLAlchemy and the dashboard through its session, with one result. The SQL is the
common subset of SQLite and PostgreSQL; ``"index"`` is quoted because it is a keyword in SQLite.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

from ciss_daemon.catalog.plain import Reader, json_value, timestamp
from ciss_daemon.catalog.states import METRIC_KEYS, JobState, VersionState

Entry = dict[str, Any]  # one JSON object of the snapshot

_TAUGHT = "SELECT id, name FROM classes WHERE taught = TRUE ORDER BY id"
_STEPS = (
    'SELECT s."index", s.state, s.reason, s.updated_at, b.name, b.class_names '
    'FROM steps s JOIN batches b ON s.batch_id = b.id ORDER BY s."index"'
)
_VERSIONS = (
    'SELECT v.version, v.is_current, v.metrics, v.promoted_at, s."index" '
    "FROM model_versions v JOIN steps s ON v.step_id = s.id "
    # "= TRUE", not the bare column: SQLite then reads both indexes instead of every version's metrics.
    f"WHERE v.is_current = TRUE OR v.state = '{VersionState.CANDIDATE}' ORDER BY v.id"
)
_JOBS = (
    "SELECT j.id, j.state, j.pid, j.attempts, j.max_attempts, j.started_at, j.heartbeat_at, j.progress, "
    's."index", b.name FROM jobs j JOIN steps s ON j.step_id = s.id JOIN batches b ON s.batch_id = b.id '
    f"WHERE j.state IN ('{JobState.RUNNING}', '{JobState.QUEUED}') ORDER BY s.\"index\", j.id"
)
_REJECTIONS = "SELECT batch_name, created_at, reasons, path FROM rejections ORDER BY created_at DESC, id DESC"
_EVENTS = (
    'SELECT e.at, e.level, e.kind, e.message, s."index" FROM events e LEFT JOIN steps s ON e.step_id = s.id '
    "ORDER BY e.at DESC, e.id DESC"
)


def _iso(value: Any) -> str | None:
    at = timestamp(value)
    return None if at is None else at.isoformat()


def _headline(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The summary numbers: the gate's grouping, and the paper's under "paper" (None before it was kept)."""
    metrics = metrics or {}
    return {**{key: metrics.get(key) for key in METRIC_KEYS}, "paper": metrics.get("paper")}


def status_snapshot(read: Reader, *, recent: int = 10) -> dict[str, Any]:
    """Everything ``ciss status`` shows, as a JSON-ready dict, in six queries."""
    taught = [{"id": cid, "name": name} for cid, name in read(_TAUGHT)]
    steps = [
        {
            "index": index,
            "batch": batch_name,
            "state": state,
            "reason": reason,
            "updated_at": _iso(updated_at),
            # A step's classes as its batch declared them: a class row may since have moved to a later batch.
            "classes": [name for _, name in sorted(json_value(names).items(), key=lambda item: int(item[0]))],
        }
        for index, state, reason, updated_at, batch_name, names in read(_STEPS)
    ]
    current, candidates = _versions(read, taught)
    running, queue = _jobs(read)
    rejections = [
        {
            "batch": batch_name,
            "at": _iso(at),
            "reason": reasons[0] if reasons else None,
            "n_reasons": len(reasons),
            "path": path,
        }
        for batch_name, at, stored, path in read(f"{_REJECTIONS} LIMIT {int(recent)}")
        for reasons in [json_value(stored) or []]
    ]
    events = [
        {"at": _iso(at), "level": level, "kind": kind, "message": message, "step": step_index}
        for at, level, kind, message, step_index in read(f"{_EVENTS} LIMIT {int(recent)}")
    ]
    return {
        "current": current,
        "candidates": candidates,
        "steps": steps,
        "counts": dict(Counter(step["state"] for step in steps)),
        "running": running,
        "queue": queue,
        "rejections": rejections,
        "events": events,
    }


def _versions(read: Reader, taught: list[Entry]) -> tuple[Entry | None, list[Entry]]:
    """The current model (with the classes it knows) and the candidates that wait for a decision."""
    current = None
    candidates = []
    for version, is_current, stored, promoted_at, step_index in read(_VERSIONS):
        metrics = json_value(stored) or {}
        if is_current:
            current = {
                "version": version,
                "step": step_index,
                "promoted_at": _iso(promoted_at),
                "classes": taught,
                "metrics": _headline(metrics.get("candidate")),
            }
        else:
            candidates.append(
                {
                    "version": version,
                    "step": step_index,
                    "metrics": _headline(metrics.get("candidate")),
                    "current_metrics": _headline(metrics.get("current")),
                }
            )
    return current, candidates


def _jobs(read: Reader) -> tuple[Entry | None, list[Entry]]:
    """The running job with its last reported progress, and the queued ones in step order."""
    running = None
    queue = []
    for job, state, pid, attempts, max_attempts, started, heartbeat, stored, step_index, batch in read(_JOBS):
        if state == JobState.RUNNING:
            progress = json_value(stored) or {}
            running = {
                "job": job,
                "step": step_index,
                "batch": batch,
                "pid": pid,
                "attempts": attempts,
                "max_attempts": max_attempts,
                "started_at": _iso(started),
                "heartbeat_at": _iso(heartbeat),
                "progress": progress,
                "eta_seconds": progress.get("eta_seconds"),
            }
        else:
            queue.append({"job": job, "step": step_index, "batch": batch, "attempts": attempts})
    return running, queue
