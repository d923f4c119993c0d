"""How a training attempt ends in the catalog: the candidate recorded and gated, a failure, or a requeue.

``service/jobs.py`` says how the child ended (an ``Outcome``); the loop (``service/daemon.py``) hands it
here inside one write transaction. The gate (``service/promotion.py``) decides; the operator functions
(``service/operator.py``) promote.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import shutil
from pathlib import Path

from sqlalchemy.orm import Session

from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.tables import Job, JobState, StepState
from ciss_daemon.exceptions import CissError
from ciss_daemon.service.operator import promote
from ciss_daemon.service.promotion import gate
from ciss_daemon.service.protocol import CANDIDATE, JobResult
from ciss_daemon.settings import Settings
from ciss_daemon.workspace import Workspace
from engine.atomic import fsync_dir

log = logging.getLogger("ciss.daemon")


def finish_training(
    s: Session, job: Job, result: JobResult, ws: Workspace, settings: Settings, *, now: dt.datetime
) -> None:
    """Record the candidate, move it into ``models/``, then promote or hold it by the gate."""
    step = job.step
    catalog.finish_job(session=s, job=job, state=JobState.DONE, now=now)
    if step.state == StepState.TRAINING:
        catalog.set_step_state(session=s, step=step, state=StepState.EVALUATING, now=now)
    version = catalog.record_model_version(
        session=s,
        step=step,
        models_dir=ws.models,
        files=result.files,
        metrics={
            "candidate": result.metrics,
            "current": result.current_metrics,
            "history": result.history,
        },
        now=now,
    )
    assert job.workdir is not None  # create_job gives every job its folder
    target, candidate = Path(version.path), Path(job.workdir, CANDIDATE)
    if candidate.is_dir():
        if target.exists():  # left by a crash after this move but before the catalog commit
            shutil.rmtree(target)
        candidate.rename(target)
    elif not holds_files(target, result.files):
        raise CissError(f"the trained model of job {job.id} is in neither {candidate} nor {target}")
    # Otherwise an earlier try moved it there, then failed before its commit (e.g. a full disk): the
    # model is whole (every hash matches) and is used as it is; deleting it would lose the training.
    fsync_dir(ws.models)
    g = settings.gate
    decision = gate(
        result.metrics,
        result.current_metrics,
        old_miou_budget=g.old_miou_budget,
        new_miou_floor=g.new_miou_floor,
        step_index=result.step_index,
    )
    if decision.promote and g.auto_promote:
        promote(ws, s, version, reason=decision.reason, now=now)
        log.info("step %d: %s promoted (%s)", step.index, version.version, decision.reason)
        return
    reason = decision.reason if not decision.promote else "auto_promote is off"
    catalog.set_step_state(session=s, step=step, state=StepState.HELD, reason=reason, now=now)
    catalog.log_event(
        session=s,
        kind="held",
        level="warning",
        message=f"step {step.index}: {version.version} held for the operator: {reason}; "
        "`ciss promote` or `ciss discard`",
        step=step,
        now=now,
    )
    log.warning("step %d: %s held: %s", step.index, version.version, reason)


def fail_job(s: Session, job: Job, message: str, *, now: dt.datetime) -> None:
    """Fail a job and its step for good, with the reason in the catalog, its event log and the log."""
    catalog.finish_job(session=s, job=job, state=JobState.FAILED, error=message, now=now)
    catalog.log_event(
        session=s,
        kind="failed",
        level="error",
        message=f"step {job.step.index} failed: {message}",
        step=job.step,
        now=now,
    )
    log.error("step %d failed: %s", job.step.index, message)


def end_attempt(s: Session, job: Job, reason: str, *, now: dt.datetime, counted: bool = True) -> None:
    """Requeue a job whose attempt ended early, or fail its step once its attempts are spent."""
    if not counted:
        job.attempts -= 1  # a requested stop (SIGTERM) is not a failed attempt
    if job.attempts >= job.max_attempts:
        fail_job(s, job, f"{reason}; gave up after {job.attempts} attempts", now=now)
        return
    catalog.requeue_job(session=s, job=job, error=reason, now=now)
    catalog.log_event(
        session=s,
        kind="requeued",
        level="warning" if counted else "info",
        message=f"step {job.step.index}: {reason}; it resumes from its checkpoint",
        step=job.step,
        now=now,
    )


def holds_files(folder: Path, files: dict[str, str]) -> bool:
    """Whether ``folder`` holds every file of ``files`` (name -> sha256) with that content."""
    if not files or not folder.is_dir():
        return False
    for name, digest in files.items():
        sha = hashlib.sha256()
        try:
            with open(folder / name, "rb") as handle:
                for chunk in iter(lambda: handle.read(1 << 20), b""):
                    sha.update(chunk)
        except OSError:
            return False
        if sha.hexdigest() != digest:
            return False
    return True
