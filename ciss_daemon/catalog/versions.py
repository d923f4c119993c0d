"""Model versions: each candidate a step's training leaves, promoted to current, retired, or rolled back to.

A version is named ``v0001``, ``v0002``... in the order recorded, and keeps the metrics the gate read
(``states.METRIC_KEYS`` are its summary numbers). Promoting one makes its step's classes taught;
rolling back to an older one rolls back every promoted step after it. Like every record function these
take an open ``session`` and never commit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ciss_daemon.catalog.steps import set_step_state
from ciss_daemon.catalog.tables import Job, JobState, ModelVersion, Step, StepState, VersionState, utcnow
from ciss_daemon.exceptions import OperatorError


def record_model_version(
    *,
    session: Session,
    step: Step,
    models_dir: Path,
    files: Mapping[str, str],
    metrics: Mapping[str, Any],
    now: dt.datetime | None = None,
) -> ModelVersion:
    """Record a candidate model of ``step``, named ``v0001``, ``v0002``..., kept in ``models_dir/<version>``.

    ``files`` maps file names to sha256; ``metrics`` is ``{"candidate": {...}, "current": {...} | None}``.
    """
    count = session.scalar(select(func.count(ModelVersion.id))) or 0
    version = f"v{count + 1:04d}"
    row = ModelVersion(
        version=version,
        step=step,
        path=str(models_dir / version),
        files=dict(files),
        metrics=dict(metrics),
        created_at=now or utcnow(),
        state=VersionState.CANDIDATE,
        is_current=False,
    )
    session.add(row)
    session.flush()
    return row


def current_version(*, session: Session) -> ModelVersion | None:
    """The model in ``models/current``, if one was promoted."""
    return session.scalar(select(ModelVersion).where(ModelVersion.is_current).limit(1))


def find_version(*, session: Session, version: str) -> ModelVersion:
    """The model version named ``version`` (e.g. ``v0003``)."""
    row = session.scalar(select(ModelVersion).where(ModelVersion.version == version))
    if row is None:
        raise OperatorError(f"no model version {version!r} in the catalog; `ciss models` lists them")
    return row


def promote_version(
    *, session: Session, version: ModelVersion, reason: str | None = None, now: dt.datetime | None = None
) -> None:
    """Make a candidate the current model: the previous one retires and the step's classes become taught."""
    if version.state != VersionState.CANDIDATE:
        raise OperatorError(f"model {version.version} is {version.state}; only a candidate can be promoted")
    at = now or utcnow()
    set_step_state(session=session, step=version.step, state=StepState.PROMOTED, reason=reason, now=at)
    previous = current_version(session=session)
    if previous is not None:
        previous.is_current = False
        previous.state = VersionState.RETIRED
    version.state = VersionState.PROMOTED
    version.is_current = True
    version.promoted_at = at
    for cls in version.step.classes:
        cls.taught = True
    session.flush()


def rollback_to(*, session: Session, version: ModelVersion, now: dt.datetime | None = None) -> list[Step]:
    """Make an earlier promoted model current again; returns the steps rolled back, by index.

    Every promoted step after the target's becomes rolled back, its model retired and its classes untaught.
    Refused while a step is training, evaluating or held, since that step builds on the model being dropped.
    """
    current = _rollback_from(session, version)
    at = now or utcnow()
    later = list(
        session.scalars(
            select(Step)
            .where(Step.state == StepState.PROMOTED, Step.index > version.step.index)
            .order_by(Step.index)
        )
    )
    for step in later:
        set_step_state(
            session=session,
            step=step,
            state=StepState.ROLLED_BACK,
            reason=f"rolled back to {version.version}",
            now=at,
        )
        for cls in step.classes:
            cls.taught = False
    current.is_current = False
    current.state = VersionState.RETIRED
    version.is_current = True
    version.state = VersionState.PROMOTED
    session.flush()
    return later


def _rollback_from(session: Session, version: ModelVersion) -> ModelVersion:
    """The current model, which a rollback to ``version`` retires; :class:`OperatorError` says why the
    rollback is refused: ``version`` is not an older promoted model, or a step builds on the current one."""
    current = current_version(session=session)
    if current is not None and current.id == version.id:
        raise OperatorError(f"model {version.version} is already the current model; nothing to roll back")
    if version.promoted_at is None or version.step.state != StepState.PROMOTED:
        raise OperatorError(
            f"model {version.version} is not a model that was promoted and is still in the history; "
            "`ciss models` lists the models you can roll back to"
        )
    if current is None or version.step.index >= current.step.index:
        raise OperatorError(
            f"model {version.version} is not older than the current model; nothing to roll back"
        )
    busy = session.scalar(
        select(Step)
        .where(Step.state.in_((StepState.TRAINING, StepState.EVALUATING, StepState.HELD)))
        .order_by(Step.index)
        .limit(1)
    )
    if busy is not None:
        hint = "promote or discard it first" if busy.state == StepState.HELD else "wait for it to finish"
        raise OperatorError(f"step {busy.index} is {busy.state}; {hint}, then roll back")
    # A requeued job resumes from a checkpoint trained on the model being dropped.
    resumable = session.scalar(
        select(Step.index)
        .join(Job, Job.step_id == Step.id)
        .where(Job.state == JobState.QUEUED, Job.attempts > 0)
    )
    if resumable is not None:
        raise OperatorError(
            f"step {resumable} has a partly trained job waiting to resume; let it finish or discard it, "
            "then roll back"
        )
    return current
