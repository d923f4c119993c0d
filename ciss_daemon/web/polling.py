"""What the dashboard polls every second: the running job with its progress, and the catalog's revision.

The progress is read from the job's own ``progress.json``, rewritten by the worker every second, rather
than from the copy the daemon stores in the catalog every two seconds. The revision changes whenever the
daemon records something, and tells the page when to fetch everything again.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon import views
from ciss_daemon.catalog.tables import Batch, Event, Job, JobState, Step
from ciss_daemon.service.jobs import read_json
from ciss_daemon.service.worker import PROGRESS
from ciss_daemon.web.charts import loss_order
from ciss_daemon.workspace import Workspace, daemon_alive


def live(ws: Workspace, factory: sessionmaker[Session]) -> dict[str, Any]:
    """What the page polls every second: the running job, the daemon, and the catalog's revision."""
    with factory() as s:
        return {
            "daemon": daemon_alive(ws.lock_path),
            "running": running(ws, s),
            "revision": revision(s),
        }


def revision(s: Session) -> str:
    """Changes whenever the daemon records something: the page re-renders when it differs."""
    last_event = s.scalar(select(func.max(Event.id))) or 0
    last_change = s.scalar(select(func.max(Step.updated_at)))
    return f"{last_event}:{last_change.isoformat() if last_change else '-'}"


def running(ws: Workspace, s: Session) -> dict[str, Any] | None:
    """The running job, its progress read from its job folder; None when nothing trains."""
    row = s.execute(
        select(Job, Step.index, Batch.name)
        .join(Step, Job.step_id == Step.id)
        .join(Batch, Step.batch_id == Batch.id)
        .where(Job.state == JobState.RUNNING)
        .order_by(Job.id)
        .limit(1)
    ).first()
    if row is None:
        return None
    job, index, batch = row
    return running_fields(ws, job.id, index, batch, job.attempts, job.max_attempts, job.progress or {})


def running_fields(
    ws: Workspace,
    job_id: int,
    step: int,
    batch: str,
    attempts: int,
    max_attempts: int,
    stored: dict[str, Any],
) -> dict[str, Any]:
    """The running job as the page shows it; ``stored`` is the progress the catalog holds for it."""
    progress = _job_progress(ws, job_id, stored)
    done, total = progress.get("iteration"), progress.get("total")
    losses = progress.get("losses") or {}
    return {
        "job": job_id,
        "step": step,
        "batch": batch,
        "attempts": attempts,
        "max_attempts": max_attempts,
        "phase": progress.get("phase", "starting"),
        "iteration": done,
        "total": total,
        "fraction": done / total if done is not None and total else None,
        "epoch": None if progress.get("epoch") is None else progress["epoch"] + 1,
        "epochs": progress.get("epochs"),
        "losses": {k: losses[k] for k in loss_order(losses)},
        "images_per_second": progress.get("images_per_second"),
        "eta_seconds": progress.get("eta_seconds"),
        "eta": views.duration(progress.get("eta_seconds")),
    }


def _job_progress(ws: Workspace, job_id: int, stored: dict[str, Any]) -> dict[str, Any]:
    """The worker's own progress.json (rewritten every second), else what the daemon copied (every 2 s)."""
    fresh = read_json(ws.jobs / str(job_id) / PROGRESS)
    return fresh if fresh is not None else stored
