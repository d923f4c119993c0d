"""The catalog's tables as SQLAlchemy ORM models; ``migrations/`` builds the same schema step by step.

Every timestamp is stored in UTC and read back as an aware ``datetime``. Constraints carry names from
one naming convention, which SQLite's batch migrations need to find and recreate them.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from ciss_daemon.catalog.states import (
    JOB_STATES,
    STEP_STATES,
    VERSION_STATES,
    JobState,  # noqa: F401
    StepState,  # noqa: F401
    VersionState,  # noqa: F401
)

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

BATCH_KINDS = ("train", "eval")


EVENT_LEVELS = ("debug", "info", "warning", "error")


def utcnow() -> dt.datetime:
    """The current time, aware, in UTC: the only kind of time the catalog stores."""
    return dt.datetime.now(dt.UTC)


class UTCDateTime(TypeDecorator[dt.datetime]):
    """An aware datetime stored as UTC. SQLite keeps no offset, so values are normalised going in."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(
                f"naive datetime {value.isoformat()} given to the catalog; pass an aware UTC time"
            )
        return value.astimezone(dt.UTC)

    def process_result_value(self, value: dt.datetime | None, dialect: Dialect) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=dt.UTC)
        return value.astimezone(dt.UTC)


def _one_of(column: str, allowed: tuple[str, ...]) -> CheckConstraint:
    values = ", ".join(f"'{v}'" for v in allowed)
    return CheckConstraint(f"{column} IN ({values})", name=column)


class Base(DeclarativeBase):
    """Base of the catalog's models; ``migrations/env.py`` compares the database with its metadata."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {dt.datetime: UTCDateTime, dict[str, Any]: JSON, list[str]: JSON}


class Batch(Base):
    """A batch folder accepted into the store (a training step's data, or an evaluation set)."""

    __tablename__ = "batches"
    __table_args__ = (_one_of("kind", BATCH_KINDS),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(255), index=True)
    kind: Mapped[str] = mapped_column(String(16))
    # Hash of the batch's content: the same data dropped twice is recognised under any folder name. Not
    # unique: a batch whose step failed, was discarded or rolled back may be accepted again.
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    received_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    store_path: Mapped[str] = mapped_column(Text)
    # The manifest's [classes]: mask value (as a JSON key, a string) -> class name.
    class_names: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # Mask value (as a JSON key) -> global class id, fixed when the batch is recorded.
    value_map: Mapped[dict[str, Any]] = mapped_column(default=dict)
    n_train: Mapped[int] = mapped_column(Integer, default=0)
    n_val: Mapped[int] = mapped_column(Integer, default=0)

    classes: Mapped[list[Class]] = relationship(back_populates="batch", order_by="Class.id")
    step: Mapped[Step | None] = relationship(back_populates="batch")


class Class(Base):
    """A class name with its global id, which is also its logit channel in every model that knows it."""

    __tablename__ = "classes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    name: Mapped[str] = mapped_column(String(255), unique=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), index=True)
    step_id: Mapped[int | None] = mapped_column(ForeignKey("steps.id"), index=True)
    # True while the current model knows the class (its step is promoted and not rolled back).
    taught: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    batch: Mapped[Batch] = relationship(back_populates="classes")
    step: Mapped[Step | None] = relationship(back_populates="classes")


class Step(Base):
    """One incremental step: learning one training batch, at a fixed position of the sequence."""

    __tablename__ = "steps"
    __table_args__ = (_one_of("state", STEP_STATES),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    # Position in the class-incremental sequence; step 0 is base training.
    index: Mapped[int] = mapped_column(Integer, unique=True)
    batch_id: Mapped[int] = mapped_column(ForeignKey("batches.id"), unique=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default="accepted")
    # Why the step is in its state, in plain words (the gate's verdict, the last error, the operator's note).
    reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    batch: Mapped[Batch] = relationship(back_populates="step")
    classes: Mapped[list[Class]] = relationship(back_populates="step", order_by="Class.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="step", order_by="Job.id")
    versions: Mapped[list[ModelVersion]] = relationship(back_populates="step", order_by="ModelVersion.id")


class Job(Base):
    """A supervised training run of one step; restarts of the same run count as attempts."""

    __tablename__ = "jobs"
    __table_args__ = (_one_of("state", JOB_STATES),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("steps.id"), index=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default="queued")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer)
    pid: Mapped[int | None] = mapped_column(Integer)
    # {iteration, total, epoch, phase, eta_seconds, loss terms...}, written by the supervisor.
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    started_at: Mapped[dt.datetime | None]
    heartbeat_at: Mapped[dt.datetime | None]
    finished_at: Mapped[dt.datetime | None]
    error: Mapped[str | None] = mapped_column(Text)
    workdir: Mapped[str | None] = mapped_column(Text)

    step: Mapped[Step] = relationship(back_populates="jobs")


class ModelVersion(Base):
    """A trained model in ``models/<version>/``: a candidate until the gate or the operator decides."""

    __tablename__ = "model_versions"
    __table_args__ = (_one_of("state", VERSION_STATES),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version: Mapped[str] = mapped_column(String(32), unique=True)
    step_id: Mapped[int] = mapped_column(ForeignKey("steps.id"), index=True)
    path: Mapped[str] = mapped_column(Text)
    # File name -> sha256, to detect a damaged model folder before loading it.
    files: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # {"candidate": {...}, "current": {...} | None}: the evaluation of this model and of the model it was
    # compared with, each with miou_all, miou_old, miou_new, hiou and per-class IoU.
    metrics: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    promoted_at: Mapped[dt.datetime | None]
    is_current: Mapped[bool] = mapped_column(Boolean, default=False, index=True)
    state: Mapped[str] = mapped_column(String(16), index=True, default="candidate")

    step: Mapped[Step] = relationship(back_populates="versions")


class Rejection(Base):
    """A dropped folder that failed validation and was moved to ``rejected/``."""

    __tablename__ = "rejections"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    batch_name: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str | None] = mapped_column(String(64))
    reasons: Mapped[list[str]] = mapped_column(default=list)
    path: Mapped[str] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)


class Event(Base):
    """One line of the daemon's history, shown by ``ciss status``."""

    __tablename__ = "events"
    __table_args__ = (_one_of("level", EVENT_LEVELS),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    level: Mapped[str] = mapped_column(String(16), default="info")
    kind: Mapped[str] = mapped_column(String(64))
    message: Mapped[str] = mapped_column(Text)
    step_id: Mapped[int | None] = mapped_column(ForeignKey("steps.id"), index=True)
