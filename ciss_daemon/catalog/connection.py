"""Opening the catalog: engines, sessions, write transactions, the daemon's lease, and schema upgrades.

Readers such as ``ciss status`` use a plain session and never upgrade.

On SQLite every connection runs in WAL mode, so readers see the last committed state while the single
writer works, and write transactions start with ``BEGIN IMMEDIATE``, so two writers queue on the busy
timeout instead of failing when one upgrades a read lock to a write lock.

On PostgreSQL a write transaction takes a transaction-level advisory lock first (``pg_advisory_xact_lock``),
which serialises writers exactly as ``BEGIN IMMEDIATE`` does; at READ COMMITTED every statement after the
lock sees what the previous writer committed. Readers opened with ``read_only=True`` run REPEATABLE READ,
READ ONLY, so one snapshot covers all the queries of ``ciss status``. A running daemon holds a session-level
advisory lock for its lifetime (:class:`DaemonLease`): one daemon per catalog, whichever host it runs on.
"""

from __future__ import annotations

import os
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from ciss_daemon.catalog import plain
from ciss_daemon.catalog.states import SCHEMA_HEAD
from ciss_daemon.catalog.tables import utcnow
from ciss_daemon.exceptions import CatalogError, DaemonRunningError, SchemaError

if TYPE_CHECKING:
    from alembic.config import Config

BUSY_TIMEOUT_MS = 5000
# Execution option that makes SQLite open the transaction with BEGIN IMMEDIATE, and PostgreSQL take the
# writers' advisory lock (see _configure_sqlite and _configure_postgresql).
_WRITE_KEY = "ciss_write"
WRITE_OPTIONS = {_WRITE_KEY: True}
# PostgreSQL advisory lock keys (64-bit, any value; these spell "cissW" and "cissD"): writers hold the
# first for one transaction, a running daemon holds the second for its lifetime. Scoped to the database.
WRITER_LOCK_KEY = 0x6369737357
DAEMON_LOCK_KEY = 0x6369737344
# Seconds a PostgreSQL connection may take to open: an unreachable server is reported, not waited on.
CONNECT_TIMEOUT_S = 10

# --- connection ------------------------------------------------------------------------------------------


def make_engine(url: str, *, foreign_keys: bool = True, read_only: bool = False) -> Engine:
    """An engine for the catalog at ``url``.

    SQLite connections get WAL mode, a busy timeout, ``synchronous = FULL`` and foreign keys (migrations
    pass ``foreign_keys=False``: batch mode recreates tables that others refer to). Readers pass
    ``read_only=True``: a reader that cannot write the catalog's folder then opens it read-only (see
    :func:`_read_only_sqlite`).
    """
    parsed = _parse_url(url)
    read_only_file = _read_only_sqlite(parsed) if read_only else None
    if read_only_file is not None:
        engine = _read_only_engine(read_only_file)
        _configure_sqlite(engine, foreign_keys=foreign_keys, read_only=True)
        return engine
    engine = _create(parsed, pool_pre_ping=parsed.get_backend_name() != "sqlite")
    if parsed.get_backend_name() == "sqlite":
        _configure_sqlite(engine, foreign_keys=foreign_keys)
    elif parsed.get_backend_name() == "postgresql":
        _configure_postgresql(engine)
        if read_only:
            engine = engine.execution_options(isolation_level="REPEATABLE READ", postgresql_readonly=True)
    return engine


def _create(url: URL, **kwargs: Any) -> Engine:
    """``create_engine`` with a missing driver reported in one line (``ciss[postgres]`` for PostgreSQL)."""
    if url.get_backend_name() == "postgresql":
        if url.drivername == "postgresql":  # SQLAlchemy's default driver for it would be psycopg2
            url = url.set(drivername="postgresql+psycopg")
        kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        return create_engine(url, **kwargs)
    except (NoSuchModuleError, ImportError) as exc:
        hint = "pip install 'ciss[postgres]'" if url.get_backend_name() == "postgresql" else "install it"
        raise CatalogError(
            f"cannot open catalog at {_describe(url)}: no database driver ({exc}); {hint}"
        ) from None


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


def _configure_postgresql(engine: Engine) -> None:
    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        if connection.get_execution_options().get(_WRITE_KEY, False):
            # Released by the transaction's commit or rollback, and by the server if the writer dies.
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({WRITER_LOCK_KEY})")


def session_reader(session: Session) -> plain.Reader:
    """Plain SQL on ``session``: the snapshot queries of ``ciss status`` (``catalog/snapshot.py``) read
    through this in the dashboard and the demo, and through the driver itself on the command line."""
    return lambda sql: session.execute(text(sql)).all()


@contextmanager
def reading(factory: sessionmaker[Session]) -> Iterator[plain.Reader]:
    """A :func:`session_reader` on a session of its own, closed when the block ends."""
    with factory() as session:
        yield session_reader(session)


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


def _read_only_sqlite(url: URL) -> Path | None:
    """The SQLite catalog's file when this process cannot write its folder and must open it read-only."""
    path = _sqlite_file(url)
    if path is None or url.query.get("uri") or not path.exists():
        return None
    return path.resolve() if plain.cannot_write(path) else None


def _read_only_engine(path: Path) -> Engine:
    # No pool: each session opens afresh, so a long-lived reader (the dashboard) sees a daemon start.
    return create_engine("sqlite://", creator=lambda: plain.open_read_only(path), poolclass=NullPool)


class DaemonLease:
    """One daemon per catalog: on PostgreSQL, a session-level advisory lock held for the daemon's lifetime.

    The workspace's ``flock`` keeps two daemons of one host apart; two hosts that share a PostgreSQL
    catalog meet here. The lock lives on a connection of its own, named after the host and pid so the
    refusal can say who holds it, and the server drops it when that connection ends, however the daemon
    dies (a host that vanishes is noticed by the server's TCP keepalive). On SQLite this is a no-op: the
    catalog file sits in the workspace, under the workspace's lock.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine: Engine | None = None
        self.connection: Any = None

    def acquire(self) -> None:
        """Take the lock or raise :class:`DaemonRunningError` naming the daemon that holds it."""
        parsed = _parse_url(self.url)
        if parsed.get_backend_name() != "postgresql":
            return
        name = f"ciss daemon {socket.gethostname()} pid {os.getpid()}"
        engine = _create(parsed, poolclass=NullPool)
        engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        try:
            connection = engine.connect()
            connection.exec_driver_sql(f"SET application_name = '{_quoted(name)}'")
            if connection.exec_driver_sql(f"SELECT pg_try_advisory_lock({DAEMON_LOCK_KEY})").scalar():
                self.engine, self.connection = engine, connection
                return
            holder = connection.exec_driver_sql(
                "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid "
                "WHERE l.locktype = 'advisory' AND l.granted AND l.database = "
                "(SELECT oid FROM pg_database WHERE datname = current_database()) "
                f"AND (l.classid::bigint << 32 | l.objid::bigint) = {DAEMON_LOCK_KEY}"
            ).scalar()
            connection.close()
        except SQLAlchemyError as exc:
            engine.dispose()
            reason = exc.__cause__ or exc
            raise CatalogError(f"cannot open catalog at {_describe(parsed)}: {reason}") from None
        engine.dispose()
        who = (holder or "ciss daemon").removeprefix("ciss daemon").strip() or "on another host"
        raise DaemonRunningError(
            f"a ciss daemon ({who}) already uses the catalog at {_describe(parsed)}; stop it first"
        )

    def release(self) -> None:
        if self.connection is not None:
            self.connection.close()  # ending the session drops its advisory locks
            self.connection = None
        if self.engine is not None:
            self.engine.dispose()
            self.engine = None


def _quoted(value: str) -> str:
    return value.replace("'", "''")


# --- schema ----------------------------------------------------------------------------------------------


def _read_revision(url: URL) -> tuple[str | None, bool]:
    """The catalog's schema revision and whether it holds any table, read without changing the file."""
    # A plain engine, not make_engine: switching a file to WAL would change it before its revision is known.
    read_only_file = _read_only_sqlite(url)
    if read_only_file is not None:
        engine = _read_only_engine(read_only_file)
    else:
        engine = _create(url, poolclass=NullPool)
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
    config.set_main_option("script_location", str(Path(__file__).resolve().parents[2] / "migrations"))
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
