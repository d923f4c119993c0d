"""Training jobs: one queued per step, started, reporting progress, requeued after a crash, and ended.

A job's state moves its step's along (queued, training, failed); the worker's folder is ``jobs/<job id>``.
Like every record function these take an open ``session`` and never commit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from ciss_daemon.catalog.steps import set_step_state
from ciss_daemon.catalog.tables import Job, JobState, Step, StepState, utcnow


def create_job(
    *, session: Session, step: Step, max_attempts: int, jobs_dir: Path, now: dt.datetime | None = None
) -> Job:
    """Queue a training job for an accepted step; its folder is ``jobs_dir/<job id>``."""
    set_step_state(session=session, step=step, state=StepState.QUEUED, now=now)
    job = Job(
        step=step, state=JobState.QUEUED, attempts=0, max_attempts=max_attempts, created_at=now or utcnow()
    )
    session.add(job)
    session.flush()
    job.workdir = str(jobs_dir / str(job.id))
    session.flush()
    return job


def start_job(*, session: Session, job: Job, pid: int, now: dt.datetime | None = None) -> None:
    """Mark a queued job running in process ``pid`` (one more attempt) and its step training."""
    if job.state != JobState.QUEUED:
        raise ValueError(f"job {job.id} is {job.state}; only a queued job can start")
    at = now or utcnow()
    set_step_state(session=session, step=job.step, state=StepState.TRAINING, now=at)
    job.state = JobState.RUNNING
    job.attempts += 1
    job.pid = pid
    job.started_at = at
    job.heartbeat_at = at
    session.flush()


def update_job_progress(
    *, session: Session, job: Job, progress: Mapping[str, Any], now: dt.datetime | None = None
) -> None:
    """Store the latest progress report of a running job; it doubles as its heartbeat."""
    job.progress = dict(progress)
    job.heartbeat_at = now or utcnow()
    session.flush()


def requeue_job(*, session: Session, job: Job, error: str, now: dt.datetime | None = None) -> None:
    """Put a running job whose attempt ended early (crash, restart) back in the queue, step included."""
    if job.state != JobState.RUNNING:
        raise ValueError(f"job {job.id} is {job.state}; only a running job can be requeued")
    set_step_state(session=session, step=job.step, state=StepState.QUEUED, reason=error, now=now)
    job.state = JobState.QUEUED
    job.pid = None
    job.error = error
    session.flush()


def finish_job(
    *, session: Session, job: Job, state: str, error: str | None = None, now: dt.datetime | None = None
) -> None:
    """End a job as done, failed or cancelled. A failed job fails its step too, with ``error`` as reason;
    after ``done`` the caller moves the step on (promoted or held) once the gate has decided."""
    if state not in (JobState.DONE, JobState.FAILED, JobState.CANCELLED):
        raise ValueError(f"job end state {state!r} is not one of done, failed, cancelled")
    if job.state not in (JobState.QUEUED, JobState.RUNNING):
        raise ValueError(f"job {job.id} is already {job.state}")
    if state == JobState.FAILED:
        set_step_state(session=session, step=job.step, state=StepState.FAILED, reason=error, now=now)
    job.state = state
    job.error = error
    job.pid = None
    job.finished_at = now or utcnow()
    session.flush()
