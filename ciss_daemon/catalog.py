"""The catalog: connection, schema upgrades, and keyword-only functions over the tables of ``db.py``.

Functions take an open ``session`` and never commit: the caller decides what one transaction holds,
usually with :func:`transaction`. Readers such as ``ciss status`` use a plain session and never upgrade.

On SQLite every connection runs in WAL mode, so readers see the last committed state while the single
writer works, and write transactions start with ``BEGIN IMMEDIATE``, so two writers queue on the busy
timeout instead of failing when one upgrades a read lock to a write lock.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import sqlite3
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from sqlalchemy import Engine, create_engine, event, func, inspect, or_, select, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon.db import (
    BATCH_KINDS,
    EVENT_LEVELS,
    SCHEMA_HEAD,
    STEP_STATES,
    Batch,
    Class,
    Event,
    Job,
    ModelVersion,
    Rejection,
    Step,
    utcnow,
)
from ciss_daemon.exceptions import CatalogError, OperatorError, SchemaError

if TYPE_CHECKING:
    from alembic.config import Config

BUSY_TIMEOUT_MS = 5000
# Execution option that makes SQLite open the transaction with BEGIN IMMEDIATE (see _on_begin).
_WRITE_KEY = "ciss_write"
WRITE_OPTIONS = {_WRITE_KEY: True}

# Which state a step may move to from each state (the lifecycle of product.md).
STEP_TRANSITIONS: dict[str, tuple[str, ...]] = {
    "accepted": ("queued", "discarded"),
    "queued": ("training", "discarded"),
    # Back to queued when an attempt crashes or the daemon restarts; the job resumes from its checkpoint.
    "training": ("evaluating", "queued", "failed"),
    "evaluating": ("promoted", "held", "failed", "queued"),
    "held": ("promoted", "discarded"),
    "promoted": ("rolled_back",),
    "failed": (),
    "discarded": (),
    "rolled_back": (),
}
# Steps in these states no longer hold back later steps, and their classes may be taught again.
SETTLED_STATES = ("promoted", "failed", "discarded", "rolled_back")
RELEASED_STATES = ("failed", "discarded", "rolled_back")
METRIC_KEYS = ("miou_all", "miou_old", "miou_new", "hiou")


# --- connection ------------------------------------------------------------------------------------------


def make_engine(url: str, *, foreign_keys: bool = True, read_only: bool = False) -> Engine:
    """An engine for the catalog at ``url``.

    SQLite connections get WAL mode, a busy timeout, ``synchronous = FULL`` and foreign keys (migrations
    pass ``foreign_keys=False``: batch mode recreates tables that others refer to). Readers pass
    ``read_only=True``: a reader that cannot write the catalog's folder then opens it read-only (see
    :func:`_read_only_sqlite`).
    """
    parsed = _parse_url(url)
    read_only_url = _read_only_sqlite(parsed) if read_only else None
    if read_only_url is not None:
        engine = create_engine(read_only_url)
        _configure_sqlite(engine, foreign_keys=foreign_keys, read_only=True)
        return engine
    try:
        engine = create_engine(parsed, pool_pre_ping=parsed.get_backend_name() != "sqlite")
    except (NoSuchModuleError, ImportError) as exc:
        raise CatalogError(
            f"cannot open catalog at {_describe(parsed)}: {exc}; install its database driver"
        ) from None
    if parsed.get_backend_name() == "sqlite":
        _configure_sqlite(engine, foreign_keys=foreign_keys)
    return engine


def _configure_sqlite(engine: Engine, *, foreign_keys: bool, read_only: bool = False) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # SQLAlchemy emits BEGIN itself (_on_begin): the sqlite3 module's own transaction handling skips
        # BEGIN before SELECT and DDL, which breaks repeatable reads and transactional migrations.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # The busy timeout goes first, so that switching to WAL waits for a lock rather than failing.
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not read_only:  # setting the journal mode is a write; a read-only file keeps the daemon's
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute(f"PRAGMA foreign_keys = {'ON' if foreign_keys else 'OFF'}")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        immediate = connection.get_execution_options().get(_WRITE_KEY, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions on ``engine``; objects stay readable after their transaction ends."""
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def transaction(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One write transaction: committed when the block ends, rolled back if it raises."""
    with factory() as session:
        session.connection(execution_options=WRITE_OPTIONS)
        yield session
        session.commit()


def _parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise CatalogError(
            f"catalog url {url!r} is not a database URL; fix [catalog] url in ciss.toml or leave it empty"
        ) from None


def _describe(url: URL) -> str:
    if url.get_backend_name() == "sqlite":
        return url.database or ":memory:"
    return url.render_as_string(hide_password=True)


def _sqlite_file(url: URL) -> Path | None:
    if url.get_backend_name() != "sqlite" or url.database in (None, "", ":memory:"):
        return None
    return Path(url.database)


def _read_only_sqlite(url: URL) -> URL | None:
    """The SQLite catalog opened read-only, for a reader that cannot write its folder; else None.

    In WAL mode SQLite reads through the ``-wal`` and ``-shm`` files beside the catalog and creates them
    when they are missing, which a user who cannot write the workspace (``ciss status`` run by someone
    else than the service's user) cannot do: every read then fails with "attempt to write a readonly
    database". While a daemon runs (or after it crashed) the files exist and a ``mode=ro`` connection
    reads through them. A stopped daemon removes them with its last connection, and then the file alone
    holds every committed change, so it is read as ``immutable``, without them.
    """
    path = _sqlite_file(url)
    if path is None or url.query.get("uri") or not path.exists():
        return None
    if os.access(path.parent, os.W_OK) and os.access(path, os.W_OK):
        return None
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    options = "mode=ro" if wal.exists() or shm.exists() else "mode=ro&immutable=1"
    return make_url(f"sqlite:///file:{quote(str(path.resolve()))}?{options}&uri=true")


# --- schema ----------------------------------------------------------------------------------------------


def _read_revision(url: URL) -> tuple[str | None, bool]:
    """The catalog's schema revision and whether it holds any table, read without changing the file."""
    # A plain engine, not make_engine: switching a file to WAL would change it before its revision is known.
    try:
        engine = create_engine(_read_only_sqlite(url) or url)
    except (NoSuchModuleError, ImportError) as exc:
        raise CatalogError(
            f"cannot open catalog at {_describe(url)}: {exc}; install its database driver"
        ) from None
    try:
        with engine.connect() as connection:
            tables = inspect(connection).get_table_names()
            if "alembic_version" not in tables:
                return None, bool(tables)
            revision = connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
            return revision, True
    except SQLAlchemyError as exc:
        raise CatalogError(f"cannot read catalog at {_describe(url)}: {exc.__cause__ or exc}") from None
    finally:
        engine.dispose()


def _alembic_config(url: str) -> Config:
    # Imported here: alembic is only needed to upgrade, and readers must start fast.
    from alembic.config import Config

    config = Config()
    # `migrations` is installed beside `ciss_daemon` (site-packages or the checkout). Found by path, not
    # by `import migrations`: a generic name another package or folder on sys.path may shadow.
    config.set_main_option("script_location", str(Path(__file__).resolve().parent.parent / "migrations"))
    # The config is an INI parser: a literal % (URL-encoded passwords) must be doubled.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def _known_revisions(config: Config) -> set[str]:
    from alembic.script import ScriptDirectory

    return {script.revision for script in ScriptDirectory.from_config(config).walk_revisions()}


def _newer_error(where: str, revision: str) -> SchemaError:
    return SchemaError(
        f"catalog at {where} has schema revision {revision}, "
        f"newer than this ciss knows (head {SCHEMA_HEAD}); upgrade ciss"
    )


def upgrade_catalog(url: str, *, backup_dir: Path | None) -> Path | None:
    """Bring the catalog's schema to head; returns the backup taken first, if any.

    An existing SQLite catalog below head is copied into ``backup_dir`` before it changes. A catalog at a
    revision this code does not know (written by a newer ciss) is refused and left untouched.
    """
    from alembic import command

    parsed = _parse_url(url)
    where = _describe(parsed)
    path = _sqlite_file(parsed)
    if path is not None and not path.parent.is_dir():
        raise CatalogError(f"cannot create catalog at {path}: folder {path.parent} does not exist")
    exists = path is None or path.exists()
    revision, has_tables = _read_revision(parsed) if exists else (None, False)
    if revision == SCHEMA_HEAD:
        return None
    config = _alembic_config(url)
    if revision is not None and revision not in _known_revisions(config):
        raise _newer_error(where, revision)
    backup = None
    if path is not None and has_tables and backup_dir is not None:
        backup = _backup_sqlite(path, backup_dir, revision)
    try:
        command.upgrade(config, "head")
    except Exception as exc:  # a migration may fail in any way; its transaction is rolled back either way
        reason = exc.__cause__ if isinstance(exc, SQLAlchemyError) and exc.__cause__ else exc
        kept = f"; a copy from before the upgrade is at {backup}" if backup is not None else ""
        raise CatalogError(
            f"cannot upgrade catalog at {where}: {reason}; it was left as it was{kept}"
        ) from None
    return backup


def _backup_sqlite(path: Path, backup_dir: Path, revision: str | None) -> Path:
    backup_dir.mkdir(parents=True, exist_ok=True)
    stem = f"catalog-{revision or 'base'}-{utcnow():%Y%m%dT%H%M%SZ}"
    target = backup_dir / f"{stem}.sqlite"
    counter = 1
    while target.exists():
        target = backup_dir / f"{stem}-{counter}.sqlite"
        counter += 1
    partial = target.with_suffix(".partial")
    # The backup API copies a consistent snapshot, WAL content included, even while others read.
    source = sqlite3.connect(path)
    copy = sqlite3.connect(partial)
    try:
        source.backup(copy)
    except sqlite3.Error as exc:
        copy.close()
        partial.unlink(missing_ok=True)
        raise CatalogError(
            f"cannot back up catalog {path} into {backup_dir}: {exc}; the catalog was not upgraded, "
            "free some space or fix the folder's permissions"
        ) from None
    finally:
        copy.close()
        source.close()
    os.replace(partial, target)
    return target


def check_catalog(url: str) -> None:
    """Raise unless the catalog exists and its schema is at head. Reads only; never upgrades."""
    parsed = _parse_url(url)
    where = _describe(parsed)
    path = _sqlite_file(parsed)
    if path is not None and not path.exists():
        raise CatalogError(f"no catalog at {path}; run `ciss init` or start `ciss daemon` to create it")
    revision, _ = _read_revision(parsed)
    if revision == SCHEMA_HEAD:
        return
    if revision is None:
        raise SchemaError(f"catalog at {where} has no schema yet; start `ciss daemon` once to create it")
    if revision not in _known_revisions(_alembic_config(url)):
        raise _newer_error(where, revision)
    raise SchemaError(
        f"catalog at {where} has schema revision {revision}, older than this ciss (head {SCHEMA_HEAD}); "
        "start `ciss daemon` once to upgrade it"
    )


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


def find_batch_by_hash(*, session: Session, sha256: str) -> Batch | None:
    """The latest accepted batch with this content hash, if any."""
    return session.scalar(select(Batch).where(Batch.sha256 == sha256).order_by(Batch.id.desc()).limit(1))


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


def taught_class_names(*, session: Session) -> set[str]:
    """Names of the classes the current model knows."""
    return set(session.scalars(select(Class.name).where(Class.taught)))


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


def step_classes(*, session: Session, step: Step) -> list[Class]:
    """The classes ``step`` teaches, by id."""
    return list(session.scalars(select(Class).where(Class.step_id == step.id).order_by(Class.id)))


def class_map(*, session: Session, upto_step: int) -> list[tuple[int, str, int]]:
    """``(class id, name, step index)`` of every class the model of step ``upto_step`` knows, by id.

    That is the classes of the promoted steps before it and of the step itself, whatever its state, so
    the map of a step being trained already holds its new classes: for the current lineage these are the
    ids 1..K, each step's classes a contiguous range after its predecessors'.
    """
    query = (
        select(Class.id, Class.name, Step.index)
        .join(Step, Class.step_id == Step.id)
        .where(Step.index <= upto_step, or_(Step.state == "promoted", Step.index == upto_step))
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
        index=0 if last is None else last + 1, batch=batch, state="accepted", created_at=at, updated_at=at
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
    allowed = STEP_TRANSITIONS[step.state]
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
    return first if first is not None and first.state == "queued" else None


def discard_step(
    *, session: Session, step: Step, reason: str | None = None, now: dt.datetime | None = None
) -> None:
    """Drop a step that is held (or not yet trained): its candidate models are discarded, its queued jobs
    cancelled, and its classes become free to be taught by a later batch."""
    set_step_state(session=session, step=step, state="discarded", reason=reason, now=now)
    for version in step.versions:
        if version.state == "candidate":
            version.state = "discarded"
    for job in step.jobs:
        if job.state == "queued":
            job.state = "cancelled"
            job.finished_at = now or utcnow()
    session.flush()


# --- jobs ------------------------------------------------------------------------------------------------


def create_job(
    *, session: Session, step: Step, max_attempts: int, jobs_dir: Path, now: dt.datetime | None = None
) -> Job:
    """Queue a training job for an accepted step; its folder is ``jobs_dir/<job id>``."""
    set_step_state(session=session, step=step, state="queued", now=now)
    job = Job(step=step, state="queued", attempts=0, max_attempts=max_attempts, created_at=now or utcnow())
    session.add(job)
    session.flush()
    job.workdir = str(jobs_dir / str(job.id))
    session.flush()
    return job


def start_job(*, session: Session, job: Job, pid: int, now: dt.datetime | None = None) -> None:
    """Mark a queued job running in process ``pid`` (one more attempt) and its step training."""
    if job.state != "queued":
        raise ValueError(f"job {job.id} is {job.state}; only a queued job can start")
    at = now or utcnow()
    set_step_state(session=session, step=job.step, state="training", now=at)
    job.state = "running"
    job.attempts += 1
    job.pid = pid
    job.started_at = at
    job.heartbeat_at = at
    session.flush()


def running_job(*, session: Session) -> Job | None:
    """The job that is running, if any."""
    return session.scalar(select(Job).where(Job.state == "running").order_by(Job.id).limit(1))


def update_job_progress(
    *, session: Session, job: Job, progress: Mapping[str, Any], now: dt.datetime | None = None
) -> None:
    """Store the latest progress report of a running job; it doubles as its heartbeat."""
    job.progress = dict(progress)
    job.heartbeat_at = now or utcnow()
    session.flush()


def requeue_job(*, session: Session, job: Job, error: str, now: dt.datetime | None = None) -> None:
    """Put a running job whose attempt ended early (crash, restart) back in the queue, step included."""
    if job.state != "running":
        raise ValueError(f"job {job.id} is {job.state}; only a running job can be requeued")
    set_step_state(session=session, step=job.step, state="queued", reason=error, now=now)
    job.state = "queued"
    job.pid = None
    job.error = error
    session.flush()


def finish_job(
    *, session: Session, job: Job, state: str, error: str | None = None, now: dt.datetime | None = None
) -> None:
    """End a job as done, failed or cancelled. A failed job fails its step too, with ``error`` as reason;
    after ``done`` the caller moves the step on (promoted or held) once the gate has decided."""
    if state not in ("done", "failed", "cancelled"):
        raise ValueError(f"job end state {state!r} is not one of done, failed, cancelled")
    if job.state not in ("queued", "running"):
        raise ValueError(f"job {job.id} is already {job.state}")
    if state == "failed":
        set_step_state(session=session, step=job.step, state="failed", reason=error, now=now)
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
        state="candidate",
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
    if version.state != "candidate":
        raise OperatorError(f"model {version.version} is {version.state}; only a candidate can be promoted")
    at = now or utcnow()
    set_step_state(session=session, step=version.step, state="promoted", reason=reason, now=at)
    previous = current_version(session=session)
    if previous is not None:
        previous.is_current = False
        previous.state = "retired"
    version.state = "promoted"
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
    if version.promoted_at is None or version.step.state != "promoted":
        raise OperatorError(
            f"model {version.version} is not a model that was promoted and is still in the history; "
            "`ciss models` lists the models you can roll back to"
        )
    if current is None or version.step.index >= current.step.index:
        raise OperatorError(
            f"model {version.version} is not older than the current model; nothing to roll back"
        )
    busy = session.scalar(
        select(Step).where(Step.state.in_(("training", "evaluating", "held"))).order_by(Step.index).limit(1)
    )
    if busy is not None:
        hint = "promote or discard it first" if busy.state == "held" else "wait for it to finish"
        raise OperatorError(f"step {busy.index} is {busy.state}; {hint}, then roll back")
    # A requeued job resumes from a checkpoint trained on the model being dropped.
    resumable = session.scalar(
        select(Step.index).join(Job, Job.step_id == Step.id).where(Job.state == "queued", Job.attempts > 0)
    )
    if resumable is not None:
        raise OperatorError(
            f"step {resumable} has a partly trained job waiting to resume; let it finish or discard it, "
            "then roll back"
        )
    at = now or utcnow()
    later = list(
        session.scalars(
            select(Step).where(Step.state == "promoted", Step.index > version.step.index).order_by(Step.index)
        )
    )
    for step in later:
        set_step_state(
            session=session,
            step=step,
            state="rolled_back",
            reason=f"rolled back to {version.version}",
            now=at,
        )
        for cls in step.classes:
            cls.taught = False
    current.is_current = False
    current.state = "retired"
    version.is_current = True
    version.state = "promoted"
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
        .where(or_(ModelVersion.is_current, ModelVersion.state == "candidate"))
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
        .where(Job.state.in_(("running", "queued")))
        .order_by(Step.index, Job.id)
    ):
        if job.state == "running":
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
