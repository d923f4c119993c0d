"""Recovery at start-up: what a crash, a kill or a power cut left behind is put right before work resumes.

Orphan training processes are stopped and their jobs requeued (they resume from their checkpoints), a
promotion cut in half is completed or undone so that ``models/current`` and the catalog agree, and
half-written temporary files are deleted.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.tables import Job, JobState, ModelVersion, StepState, VersionState
from ciss_daemon.service.intake import Transaction
from ciss_daemon.service.jobs import stop_orphan, temp_files
from ciss_daemon.service.promotion import current_target, swap_current
from ciss_daemon.service.training import end_attempt
from ciss_daemon.settings import Settings
from ciss_daemon.workspace import Workspace

log = logging.getLogger("ciss.daemon")


def recover(ws: Workspace, settings: Settings, transaction: Transaction, *, now: dt.datetime) -> None:
    """After a crash or restart: stop orphan workers, requeue running jobs, repair ``models/current``."""
    with transaction() as s:
        for job in s.scalars(select(Job).where(Job.state == JobState.RUNNING)):
            assert job.workdir is not None  # create_job gives every job its folder
            stop_orphan(job.pid, Path(job.workdir), settings.daemon.stop_timeout_seconds)
            end_attempt(s, job, "the daemon restarted during training", now=now)
        reconcile_current(s, ws, now=now)
    remove_leftovers(ws)


def remove_leftovers(ws: Workspace) -> None:
    """Delete the temporary files a crash left half-written; never anything a user gave or a model.

    Checkpoints and model files are written as ``.<name>.<random>.tmp`` then renamed, a batch is copied
    into a hidden ``store/.<name>.<random>`` folder then renamed, and ``models/current`` is swapped
    through ``models/.current.<pid>.tmp``. A kill before the rename leaves them behind, each as large
    as what it was writing (a checkpoint holds the model twice), so weeks of crashes would fill the
    disk. Runs at start-up, after orphan workers are stopped and under the lock: nothing writes them.
    """
    files = [
        *(path for job_dir in ws.jobs.iterdir() if job_dir.is_dir() for path in temp_files(job_dir)),
        *ws.models.glob(".*.tmp"),
        *ws.models.glob("*/.*.tmp"),
    ]
    for path in files:
        if path.is_symlink() or path.is_file():
            path.unlink(missing_ok=True)
    for path in ws.store.glob(".*"):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
    if files:
        log.info("removed %d temporary files left by an earlier crash", len(files))


def reconcile_current(s: Session, ws: Workspace, *, now: dt.datetime) -> None:
    """Make ``models/current`` and the catalog agree after a crash in the middle of a promotion.

    The pointer is swapped before the catalog is updated: a pointer naming a candidate means the
    promotion was decided, so it is completed; any other disagreement is settled by the catalog.
    """
    current = catalog.current_version(session=s)
    target = current_target(ws.models)
    if current is not None and target == current.version:
        return
    named = s.scalar(select(ModelVersion).where(ModelVersion.version == target)) if target else None
    if named is not None and named.state == VersionState.CANDIDATE:
        if named.step.state == StepState.EVALUATING:
            catalog.set_step_state(session=s, step=named.step, state=StepState.HELD, now=now)
        catalog.promote_version(
            session=s, version=named, reason="promotion completed after a restart", now=now
        )
        catalog.log_event(
            session=s,
            kind="promoted",
            message=f"{named.version} promotion completed after a restart",
            step=named.step,
            now=now,
        )
    elif current is not None:
        swap_current(ws.models, current.version)
    elif target is not None:
        (ws.models / "current").unlink()
