"""The record functions: keyword-only functions over the tables of ``catalog/tables.py``.

Functions take an open ``session`` and never commit: the caller decides what one transaction holds,
usually with ``catalog.connection.transaction``.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ciss_daemon.catalog.states import SETTLED_STATES
from ciss_daemon.catalog.tables import (
    BATCH_KINDS,
    EVENT_LEVELS,
    STEP_STATES,
    Batch,
    Class,
    Event,
    Job,
    JobState,
    ModelVersion,
    Rejection,
    Step,
    StepState,
    VersionState,
    utcnow,
)
from ciss_daemon.exceptions import CatalogError, OperatorError

# Which state a step may move to from each state (the lifecycle of docs/product.md).
STEP_TRANSITIONS: dict[StepState, tuple[StepState, ...]] = {
    StepState.ACCEPTED: (StepState.QUEUED, StepState.DISCARDED),
    StepState.QUEUED: (StepState.TRAINING, StepState.DISCARDED),
    # Back to queued when an attempt crashes or the daemon restarts; the job resumes from its checkpoint.
    StepState.TRAINING: (StepState.EVALUATING, StepState.QUEUED, StepState.FAILED),
    StepState.EVALUATING: (StepState.PROMOTED, StepState.HELD, StepState.FAILED, StepState.QUEUED),
    StepState.HELD: (StepState.PROMOTED, StepState.DISCARDED),
    StepState.PROMOTED: (StepState.ROLLED_BACK,),
    StepState.FAILED: (),
    StepState.DISCARDED: (),
    StepState.ROLLED_BACK: (),
}
RELEASED_STATES = (StepState.FAILED, StepState.DISCARDED, StepState.ROLLED_BACK)

# --- batches, classes, rejections ------------------------------------------------------------------------


def record_batch(
    *,
    session: Session,
    name: str,
    kind: str,
    sha256: str,
    store_path: Path | str,
    class_names: Mapping[int, str],
    n_train: int,
    n_val: int,
    now: dt.datetime | None = None,
) -> Batch:
    """Record an accepted batch; ``class_names`` maps its mask values to class names.

    A training batch's names become classes (new ids in mask-value order); an evaluation batch refers to
    classes by name, and its ``value_map`` holds those known now (see :func:`batch_value_map`).
    """
    if kind not in BATCH_KINDS:
        raise ValueError(f"batch kind {kind!r} is not one of {', '.join(BATCH_KINDS)}")
    values = sorted(class_names)
    batch = Batch(
        name=name,
        kind=kind,
        sha256=sha256,
        received_at=now or utcnow(),
        store_path=str(store_path),
        class_names={str(v): class_names[v] for v in values},
        n_train=n_train,
        n_val=n_val,
    )
    session.add(batch)
    session.flush()
    if kind == "train":
        classes = add_classes(session=session, batch=batch, names=[class_names[v] for v in values], now=now)
        batch.value_map = {str(v): c.id for v, c in zip(values, classes, strict=True)}
    else:
        batch.value_map = {str(v): i for v, i in _resolve_names(session, batch.class_names).items()}
    return batch


def _resolve_names(session: Session, names: Mapping[str, str]) -> dict[int, int]:
    ids = dict(session.execute(select(Class.name, Class.id).where(Class.name.in_(names.values()))).all())
    return {int(v): ids[n] for v, n in names.items() if n in ids}


def batch_value_map(*, session: Session, batch: Batch) -> dict[int, int]:
    """Mask value -> global class id. For an evaluation batch, names are resolved against today's classes,
    so a class taught after the set arrived is scored; values of classes not known yet are left out."""
    if batch.kind == "train":
        return {int(v): i for v, i in batch.value_map.items()}
    return _resolve_names(session, batch.class_names)


def live_batch_hashes(*, session: Session) -> set[str]:
    """Content hashes a new batch may not repeat: evaluation sets, and training batches whose step is not
    failed, discarded or rolled back (those may be submitted again, unchanged)."""
    rows = session.execute(select(Batch.sha256, Step.state).outerjoin(Step, Step.batch_id == Batch.id))
    return {sha256 for sha256, state in rows if state not in RELEASED_STATES}


def unavailable_class_names(*, session: Session) -> set[str]:
    """Class names a new training batch may not declare: taught, or pending in an unfinished step."""
    rows = session.execute(
        select(Class.name, Class.taught, Step.state).outerjoin(Step, Class.step_id == Step.id)
    )
    return {name for name, taught, state in rows if taught or state not in RELEASED_STATES}


def record_rejection(
    *,
    session: Session,
    batch_name: str,
    reasons: Sequence[str],
    path: Path | str,
    sha256: str | None = None,
    now: dt.datetime | None = None,
) -> Rejection:
    """Record a folder that failed validation and now lies at ``path`` (in ``rejected/``)."""
    rejection = Rejection(
        batch_name=batch_name,
        sha256=sha256,
        reasons=list(reasons),
        path=str(path),
        created_at=now or utcnow(),
    )
    session.add(rejection)
    session.flush()
    return rejection


def add_classes(
    *, session: Session, batch: Batch, names: Sequence[str], now: dt.datetime | None = None
) -> list[Class]:
    """The classes ``batch`` teaches, in the order of ``names``, with the next global ids.

    A name that is taught, or pending in an unfinished step, is refused. A name dropped by a failed,
    discarded or rolled-back step is taken over by the new batch (names are unique in the catalog).
    """
    if len(set(names)) != len(names):
        raise ValueError(f"batch {batch.name!r}: class names repeat: {list(names)}")
    existing = {c.name: c for c in session.scalars(select(Class).where(Class.name.in_(names)))}
    last_id = session.scalar(select(func.max(Class.id)))
    next_id = 1 if last_id is None else last_id + 1
    classes = []
    for name in names:
        cls = existing.get(name)
        if cls is None:
            cls = Class(id=next_id, name=name, batch=batch, taught=False, created_at=now or utcnow())
            session.add(cls)
            next_id += 1
        elif cls.taught:
            raise CatalogError(f"batch {batch.name!r}: class {name!r} is already taught (id {cls.id})")
        elif cls.step is None or cls.step.state not in RELEASED_STATES:
            owner = (
                "a batch being recorded" if cls.step is None else f"step {cls.step.index} ({cls.step.state})"
            )
            raise CatalogError(
                f"batch {batch.name!r}: class {name!r} is already being taught by {owner}; "
                "wait for that step to finish or discard it"
            )
        else:
            cls.batch = batch
            cls.step = None
        classes.append(cls)
    _compact_class_ids(session)
    return classes


def _compact_class_ids(session: Session) -> None:
    """Renumber classes so that taught and pending ones hold ids 1..N in step order.

    The engine gives a model of K classes the logit channels 1..K, and each step a contiguous range after
    its predecessors'. When a step is released (failed, discarded, rolled back) its classes move after
    all others, and the pending steps behind it close the gap. Only steps that have not started training
    move: every step before a running one is settled, and rollback refuses while a job has started.
    """
    session.flush()
    rows = session.execute(select(Class, Step.index, Step.state).outerjoin(Step, Class.step_id == Step.id))
    positions: dict[int, dict[str, int]] = {}
    for batch_id, names in session.execute(select(Batch.id, Batch.class_names)):
        ordered = sorted(names.items(), key=lambda item: int(item[0]))
        positions[batch_id] = {name: i for i, (_, name) in enumerate(ordered)}

    def order(row: tuple[Class, int | None, str | None]) -> tuple[Any, ...]:
        cls, index, state = row
        released = state in RELEASED_STATES
        # Classes of a batch not yet made a step (index None) come after every step.
        rank = math.inf if released or index is None else index
        return (released, rank, cls.batch_id, positions.get(cls.batch_id, {}).get(cls.name, math.inf), cls.id)

    ordered = [row[0] for row in sorted(rows, key=order)]
    moves = {cls: new for new, cls in enumerate(ordered, start=1) if cls.id != new}
    if not moves:
        return
    # Two passes through negative ids, so no update collides with an id another row still holds.
    for cls, new in moves.items():
        cls.id = -new
    session.flush()
    for cls, new in moves.items():
        cls.id = new
    session.flush()
    for batch in {cls.batch for cls in moves}:
        ids = {cls.name: cls.id for cls in batch.classes}
        batch.value_map = {v: ids[name] for v, name in batch.class_names.items() if name in ids}
    session.flush()


def class_map(*, session: Session, upto_step: int) -> list[tuple[int, str, int]]:
    """``(class id, name, step index)`` of every class the model of step ``upto_step`` knows, by id.

    That is the classes of the promoted steps before it and of the step itself, whatever its state, so
    the map of a step being trained already holds its new classes: for the current lineage these are the
    ids 1..K, each step's classes a contiguous range after its predecessors'.
    """
    query = (
        select(Class.id, Class.name, Step.index)
        .join(Step, Class.step_id == Step.id)
        .where(Step.index <= upto_step, or_(Step.state == StepState.PROMOTED, Step.index == upto_step))
        .order_by(Class.id)
    )
    return [(cid, name, index) for cid, name, index in session.execute(query)]


# --- steps -----------------------------------------------------------------------------------------------


def create_step(*, session: Session, batch: Batch, now: dt.datetime | None = None) -> Step:
    """The next step of the sequence, learning ``batch``; step 0 is the first training batch."""
    if batch.kind != "train":
        raise ValueError(f"batch {batch.name!r} is an evaluation set; only a training batch becomes a step")
    last = session.scalar(select(func.max(Step.index)))
    at = now or utcnow()
    step = Step(
        index=0 if last is None else last + 1,
        batch=batch,
        state=StepState.ACCEPTED,
        created_at=at,
        updated_at=at,
    )
    session.add(step)
    for cls in batch.classes:
        cls.step = step
    session.flush()
    return step


def set_step_state(
    *, session: Session, step: Step, state: str, reason: str | None = None, now: dt.datetime | None = None
) -> None:
    """Move ``step`` to ``state`` along the lifecycle; an illegal move raises :class:`OperatorError`."""
    if state not in STEP_STATES:
        raise ValueError(f"step state {state!r} is not one of {', '.join(STEP_STATES)}")
    allowed = STEP_TRANSITIONS[StepState(step.state)]
    if state not in allowed:
        options = ", ".join(allowed) if allowed else "none, it is final"
        raise OperatorError(
            f"step {step.index} is {step.state}; it cannot become {state} (allowed: {options})"
        )
    step.state = state
    step.reason = reason
    step.updated_at = now or utcnow()
    session.flush()
    if state in RELEASED_STATES:
        _compact_class_ids(session)


def next_runnable_step(*, session: Session) -> Step | None:
    """The step to train next: the earliest unsettled step, if it is queued.

    Later steps wait for earlier ones: each trains from the model its predecessors leave behind, so a
    step that is training, evaluating or held blocks every step after it.
    """
    first = session.scalar(
        select(Step).where(Step.state.not_in(SETTLED_STATES)).order_by(Step.index).limit(1)
    )
    return first if first is not None and first.state == StepState.QUEUED else None


def discard_step(
    *, session: Session, step: Step, reason: str | None = None, now: dt.datetime | None = None
) -> None:
    """Drop a step that is held (or not yet trained): its candidate models are discarded, its queued jobs
    cancelled, and its classes become free to be taught by a later batch."""
    set_step_state(session=session, step=step, state=StepState.DISCARDED, reason=reason, now=now)
    for version in step.versions:
        if version.state == VersionState.CANDIDATE:
            version.state = VersionState.DISCARDED
    for job in step.jobs:
        if job.state == JobState.QUEUED:
            job.state = JobState.CANCELLED
            job.finished_at = now or utcnow()
    session.flush()


# --- jobs ------------------------------------------------------------------------------------------------


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


# --- model versions --------------------------------------------------------------------------------------


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


# --- events ----------------------------------------------------------------------------------------------


def log_event(
    *,
    session: Session,
    kind: str,
    message: str,
    level: str = "info",
    step: Step | None = None,
    now: dt.datetime | None = None,
) -> Event:
    """Add one line to the history ``ciss status`` shows."""
    if level not in EVENT_LEVELS:
        raise ValueError(f"event level {level!r} is not one of {', '.join(EVENT_LEVELS)}")
    event_row = Event(
        at=now or utcnow(), level=level, kind=kind, message=message, step_id=step.id if step else None
    )
    session.add(event_row)
    session.flush()
    return event_row
