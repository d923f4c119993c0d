"""Batches, the classes they teach and the folders rejected: recorded as they arrive.

A training batch's class names become classes with the next global ids; an evaluation batch refers to
classes by name. A name whose step was released may be taught again, and is then taken over by the new
batch. Like every record function these take an open ``session`` and never commit.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from pathlib import Path

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from ciss_daemon.catalog.steps import RELEASED_STATES, compact_class_ids
from ciss_daemon.catalog.tables import BATCH_KINDS, Batch, Class, Rejection, Step, StepState, utcnow
from ciss_daemon.exceptions import CatalogError


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
    compact_class_ids(session)
    return classes


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
