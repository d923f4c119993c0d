"""Fixtures of the catalog function tests: a catalog at schema head on each backend, upgraded once per
module and copied for each test (a SQLite file copy, or a PostgreSQL database made from a template), and a
session factory and session on it."""

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgres import PostgresServer
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon.catalog import connection


@pytest.fixture(scope="module")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Upgraded once; each test works on its own copy.
    path = tmp_path_factory.mktemp("template") / "catalog.sqlite"
    connection.upgrade_catalog(f"sqlite:///{path}", backup_dir=None)
    return path


@pytest.fixture(scope="module")
def postgres_template(postgres: PostgresServer) -> str:
    # Upgraded once; each test gets a database copied from it (CREATE DATABASE ... TEMPLATE).
    url = postgres.new_database()
    connection.upgrade_catalog(url, backup_dir=None)
    return url.rpartition("/")[2]


@pytest.fixture
def url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    if backend == "postgresql":
        postgres: PostgresServer = request.getfixturevalue("postgres")
        return postgres.new_database(template=request.getfixturevalue("postgres_template"))
    path = tmp_path / "catalog.sqlite"
    shutil.copy(request.getfixturevalue("sqlite_template"), path)
    return f"sqlite:///{path}"


@pytest.fixture
def factory(url: str) -> Iterator[sessionmaker[Session]]:
    engine = connection.make_engine(url)
    yield connection.session_factory(engine)
    engine.dispose()


@pytest.fixture
def session(factory: sessionmaker[Session]) -> Iterator[Session]:
    with factory() as s:
        yield s
