"""The step lifecycle: the states a step moves through, one allowed move at a time.

Each step trains from the model its predecessors leave behind, so steps run in index order, and a step that
is released (failed, discarded, rolled back) gives up its class ids to the steps behind it. Like every record
function these take an open ``session`` and never commit.
"""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from ciss_daemon.catalog.states import SETTLED_STATES
from ciss_daemon.catalog.tables import (
    STEP_STATES,
    Batch,
    Class,
    JobState,
    Step,
    StepState,
    VersionState,
    utcnow,
)
from ciss_daemon.exceptions import OperatorError

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
# Steps whose classes may be taught again (``SETTLED_STATES`` less promoted).
RELEASED_STATES = (StepState.FAILED, StepState.DISCARDED, StepState.ROLLED_BACK)


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
        compact_class_ids(session)


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


def compact_class_ids(session: Session) -> None:
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
