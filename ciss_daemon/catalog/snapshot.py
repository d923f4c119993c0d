"""The catalog as `ciss status` and the dashboard show it: one snapshot of steps, jobs and models."""

from __future__ import annotations

import datetime as dt
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from ciss_daemon.catalog.tables import (
    Batch,
    Class,
    Event,
    Job,
    JobState,
    ModelVersion,
    Rejection,
    Step,
    VersionState,
)
from ciss_daemon.catalog.versions import METRIC_KEYS

# --- status ----------------------------------------------------------------------------------------------


def _iso(value: dt.datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _headline(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """The summary numbers: the gate's grouping, and the paper's under "paper" (None before it was kept)."""
    metrics = metrics or {}
    return {**{key: metrics.get(key) for key in METRIC_KEYS}, "paper": metrics.get("paper")}


def status_snapshot(*, session: Session, recent: int = 10) -> dict[str, Any]:
    """Everything ``ciss status`` shows, as a JSON-ready dict, in a fixed handful of queries."""
    taught = [
        {"id": cid, "name": name}
        for cid, name in session.execute(select(Class.id, Class.name).where(Class.taught).order_by(Class.id))
    ]
    # A step's classes as its batch declared them: a class row may since have moved to a later batch.
    steps = [
        {
            "index": index,
            "batch": batch_name,
            "state": state,
            "reason": reason,
            "updated_at": _iso(updated_at),
            "classes": [name for _, name in sorted(class_names.items(), key=lambda item: int(item[0]))],
        }
        for index, state, reason, updated_at, batch_name, class_names in session.execute(
            select(Step.index, Step.state, Step.reason, Step.updated_at, Batch.name, Batch.class_names)
            .join(Batch, Step.batch_id == Batch.id)
            .order_by(Step.index)
        )
    ]

    versions = session.execute(
        select(ModelVersion, Step.index)
        .join(Step, ModelVersion.step_id == Step.id)
        .where(or_(ModelVersion.is_current, ModelVersion.state == VersionState.CANDIDATE))
        .order_by(ModelVersion.id)
    )
    current = None
    candidates = []
    for version, step_index in versions:
        if version.is_current:
            current = {
                "version": version.version,
                "step": step_index,
                "promoted_at": _iso(version.promoted_at),
                "classes": taught,
                "metrics": _headline(version.metrics.get("candidate")),
            }
        else:
            candidates.append(
                {
                    "version": version.version,
                    "step": step_index,
                    "metrics": _headline(version.metrics.get("candidate")),
                    "current_metrics": _headline(version.metrics.get("current")),
                }
            )

    running = None
    queue = []
    for job, step_index, batch_name in session.execute(
        select(Job, Step.index, Batch.name)
        .join(Step, Job.step_id == Step.id)
        .join(Batch, Step.batch_id == Batch.id)
        .where(Job.state.in_((JobState.RUNNING, JobState.QUEUED)))
        .order_by(Step.index, Job.id)
    ):
        if job.state == JobState.RUNNING:
            progress = job.progress or {}
            running = {
                "job": job.id,
                "step": step_index,
                "batch": batch_name,
                "pid": job.pid,
                "attempts": job.attempts,
                "max_attempts": job.max_attempts,
                "started_at": _iso(job.started_at),
                "heartbeat_at": _iso(job.heartbeat_at),
                "progress": progress,
                "eta_seconds": progress.get("eta_seconds"),
            }
        else:
            queue.append({"job": job.id, "step": step_index, "batch": batch_name, "attempts": job.attempts})

    rejections = [
        {
            "batch": r.batch_name,
            "at": _iso(r.created_at),
            "reason": r.reasons[0] if r.reasons else None,
            "n_reasons": len(r.reasons),
            "path": r.path,
        }
        for r in session.scalars(
            select(Rejection).order_by(Rejection.created_at.desc(), Rejection.id.desc()).limit(recent)
        )
    ]
    events = [
        {"at": _iso(e.at), "level": e.level, "kind": e.kind, "message": e.message, "step": step_index}
        for e, step_index in session.execute(
            select(Event, Step.index)
            .outerjoin(Step, Event.step_id == Step.id)
            .order_by(Event.at.desc(), Event.id.desc())
            .limit(recent)
        )
    ]

    counts: dict[str, int] = defaultdict(int)
    for step in steps:
        counts[step["state"]] += 1
    return {
        "current": current,
        "candidates": candidates,
        "steps": steps,
        "counts": dict(counts),
        "running": running,
        "queue": queue,
        "rejections": rejections,
        "events": events,
    }
