"""Reading the catalog with plain SQL through the database's own driver, without SQLAlchemy.

``ciss status`` is typed by people and polled by scripts, so it must start in a fraction of a second;
importing SQLAlchemy alone takes longer than that on a small machine. Its queries are plain SQL, run
either here (``sqlite3`` or ``psycopg``) or on a SQLAlchemy session (``connection.session_reader``):
one :data:`Reader` serves both, so there is one snapshot query for the command line and the dashboard.

Only the two URL forms the product writes are read here: ``sqlite:///<file>`` and
``postgresql[+psycopg]://...``; anything else raises :class:`NotPlain` and the caller takes the
SQLAlchemy path, which also words every error.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

# One query in, its rows out: the snapshot code's only access to the catalog.
Reader = Callable[[str], Sequence[Sequence[Any]]]

BUSY_TIMEOUT_S = 5.0
CONNECT_TIMEOUT_S = 10


class NotPlain(Exception):
    """The catalog cannot be read here (an unusual URL, a missing file or driver): use SQLAlchemy."""


def sqlite_path(url: str) -> Path | None:
    """The file of a plain ``sqlite:///<file>`` URL; None for any other backend or form."""
    if not url.startswith("sqlite:///"):
        return None
    database = url.removeprefix("sqlite:///")
    if not database or database == ":memory:" or any(c in database for c in "?%"):
        return None
    return Path(database)


def cannot_write(path: Path) -> bool:
    """Whether this process may not write the SQLite file at ``path`` or create files beside it."""
    return not (os.access(path.parent, os.W_OK) and os.access(path, os.W_OK))


def open_read_only(path: Path) -> sqlite3.Connection:
    """The catalog at ``path`` opened read-only, by a user who cannot write its folder.

    In WAL mode SQLite reads through the ``-wal`` and ``-shm`` files beside the catalog and creates them
    when they are missing, which a user who cannot write the workspace (``ciss status`` run by someone
    else than the service's user) cannot do: the read then fails with "attempt to write a readonly
    database". While a daemon runs (or after it crashed) the files exist and a ``mode=ro`` connection
    reads through them. A stopped daemon removes them with its last connection, and then the file alone
    holds every committed change, so it is read as ``immutable``, without them. The files also come and
    go while the owner runs ``ciss status`` against a stopped daemon, so the choice is checked by a first
    read and made again when the files vanished in between.
    """
    wal, shm = (path.with_name(path.name + suffix) for suffix in ("-wal", "-shm"))
    for _ in range(3):
        through_wal = wal.exists() or shm.exists()
        options = "mode=ro" if through_wal else "mode=ro&immutable=1"
        connection = sqlite3.connect(f"file:{quote(str(path))}?{options}", uri=True, check_same_thread=False)
        if not through_wal:
            return connection
        try:
            connection.execute("SELECT count(*) FROM sqlite_master").fetchone()  # opens the WAL index
            return connection
        except sqlite3.OperationalError:
            connection.close()
            if wal.exists() or shm.exists():
                raise
    raise sqlite3.OperationalError(f"{path}: its -wal and -shm files keep appearing and vanishing")


@contextmanager
def reading(url: str) -> Iterator[Reader]:
    """A :data:`Reader` on the catalog at ``url``, all its queries in one read transaction (one snapshot)."""
    path = sqlite_path(url)
    if path is not None:
        with _sqlite_reading(path) as read:
            yield read
    elif url.startswith(("postgresql://", "postgresql+psycopg://")):
        with _postgresql_reading("postgresql://" + url.split("://", 1)[1]) as read:
            yield read
    else:
        raise NotPlain(url)


@contextmanager
def _sqlite_reading(path: Path) -> Iterator[Reader]:
    if not path.is_file():
        raise NotPlain(f"no catalog file at {path}")
    resolved = path.resolve()
    try:
        if cannot_write(resolved):
            connection = open_read_only(resolved)
        else:
            connection = sqlite3.connect(resolved, timeout=BUSY_TIMEOUT_S)
    except sqlite3.Error as exc:
        raise NotPlain(str(exc)) from None
    connection.isolation_level = None  # BEGIN is ours: every query of the snapshot sees one state
    try:
        connection.execute("BEGIN")
        yield _reader(connection.execute, sqlite3.Error)
    finally:
        connection.close()  # ends the read transaction


@contextmanager
def _postgresql_reading(conninfo: str) -> Iterator[Reader]:
    try:
        import psycopg
    except ImportError:
        raise NotPlain("psycopg is not installed") from None
    try:
        connection = psycopg.connect(conninfo, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.Error as exc:
        raise NotPlain(str(exc)) from None
    # One snapshot for every query, as the SQLAlchemy readers get (connection.make_engine, read_only=True).
    connection.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
    connection.read_only = True
    try:
        yield _reader(connection.execute, psycopg.Error)
    finally:
        connection.close()


def _reader(execute: Callable[[str], Any], errors: type[Exception]) -> Reader:
    """A :data:`Reader` over a driver's ``execute``; its errors become :class:`NotPlain`."""

    def read(sql: str) -> Sequence[Sequence[Any]]:
        try:
            return execute(sql).fetchall()
        except errors as exc:
            raise NotPlain(str(exc)) from None

    return read


def schema_revision(read: Reader) -> str | None:
    """The catalog's Alembic revision; None when the table is empty. A catalog without the table (not
    created yet) raises: :class:`NotPlain` here, SQLAlchemy's error on a session."""
    rows = read("SELECT version_num FROM alembic_version")
    return str(rows[0][0]) if rows else None


def timestamp(value: Any) -> dt.datetime | None:
    """A stored time as an aware UTC datetime: SQLite returns the text it keeps, PostgreSQL a datetime."""
    if value is None:
        return None
    at = dt.datetime.fromisoformat(value) if isinstance(value, str) else value
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


def json_value(value: Any) -> Any:
    """A JSON column's value: SQLite returns the text, PostgreSQL (and SQLAlchemy's JSON type) the object."""
    return json.loads(value) if isinstance(value, str) else value
