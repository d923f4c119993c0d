"""Shared pytest hooks: tests marked ``gpu`` skip cleanly on a machine without CUDA; the catalog backends
(SQLite, and PostgreSQL from a throwaway server, see tests/helpers/postgres.py) that tests are parametrised
over."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import rayhead
import torch
from postgres import REQUIRED_ENV, PostgresServer, Unavailable, postgres_server

# Parametrise a test or fixture over both catalog backends with ``params=BACKENDS``.
BACKENDS = ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the session; skips (fails under ``.ci/run``) when none can be had."""
    try:
        context = postgres_server()
        server = context.__enter__()
    except Unavailable as exc:
        if os.environ.get(REQUIRED_ENV) == "1":
            pytest.fail(f"PostgreSQL is required here: {exc}")
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(scope="session")
def ray_head() -> Iterator[str]:
    """A Ray head on 127.0.0.1 for the session (helpers/rayhead.py), as ``host:port``; skips (fails under
    ``.ci/run``) when Ray is not installed."""
    try:
        context = rayhead.ray_head()
        address = context.__enter__()
    except rayhead.Unavailable as exc:
        if os.environ.get(rayhead.REQUIRED_ENV) == "1":
            pytest.fail(f"a Ray head is required here: {exc}")
        pytest.skip(str(exc))
    try:
        yield address
    finally:
        context.__exit__(None, None, None)


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    """The catalog backend a test runs on: "sqlite" or "postgresql"."""
    return request.param


@pytest.fixture
def new_catalog_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> str:
    """The URL of a catalog that does not exist yet: a SQLite file, or an empty PostgreSQL database."""
    if backend == "sqlite":
        return f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    return request.getfixturevalue("postgres").new_database()


@pytest.fixture
def workspace_catalog(backend: str, request: pytest.FixtureRequest) -> str | None:
    """The ``[catalog] url`` a test workspace gets: None (its own SQLite file) or an empty PostgreSQL
    database (pass it to ``daemon_helpers.new_workspace(..., catalog_url=...)``)."""
    if backend == "sqlite":
        return None
    return request.getfixturevalue("postgres").new_database()
