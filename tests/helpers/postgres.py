"""A throwaway PostgreSQL server for the tests that run the catalog on PostgreSQL as well as SQLite.

The ``postgres`` fixture (conftest.py) uses the server named by ``CISS_TEST_POSTGRES_URL`` (an admin URL
such as ``postgresql://postgres@127.0.0.1:5432/postgres``) or else starts its own cluster with the
server binaries (``initdb`` and ``pg_ctl`` from Debian's ``postgresql`` package) in a temporary folder,
listening on 127.0.0.1 only, and removes it at the end of the session. PostgreSQL refuses to run as root,
so under root the cluster runs as the ``postgres`` user (or ``nobody``). Without binaries the PostgreSQL
cases skip, unless ``CISS_TEST_POSTGRES_REQUIRED=1`` (set by ``.ci/run``) makes that a failure.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

URL_ENV = "CISS_TEST_POSTGRES_URL"
REQUIRED_ENV = "CISS_TEST_POSTGRES_REQUIRED"


class Unavailable(Exception):
    """No PostgreSQL server can be had on this machine."""


class PostgresServer:
    """A running server reached through ``admin_url``; hands out fresh, empty databases."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.count = 0

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.admin_url.replace("+psycopg", ""), autocommit=True) as db:
            db.execute(sql)

    def url(self, database: str) -> str:
        base, _, _ = self.admin_url.rpartition("/")
        return f"{base}/{database}"

    def new_database(self, template: str | None = None) -> str:
        """A new database (a copy of ``template`` when given, else empty); returns its URL."""
        self.count += 1
        name = f"ciss_test_{os.getpid()}_{self.count}"
        self._admin(f'CREATE DATABASE "{name}"' + (f' TEMPLATE "{template}"' if template else ""))
        return self.url(name)

    def terminate(self, database: str) -> None:
        """End every session on ``database`` (what a server sees when the client's host dies)."""
        self._admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{database}'")


def _bindir() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name))
    if found:
        return Path(found[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise Unavailable("no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def throwaway_cluster() -> Iterator[PostgresServer]:
    """Start a cluster in a temporary folder on 127.0.0.1; stop it and remove the folder afterwards."""
    bindir = _bindir()
    # Not under pytest's tmp folder: it is private to the user running the tests, and the server may run
    # as another one.
    root = Path(tempfile.mkdtemp(prefix="ciss-pg-"))
    prefix: list[str] = []
    if os.geteuid() == 0:
        user = next((u for u in ("postgres", "nobody") if _exists(u)), None)
        if user is None:
            raise Unavailable("running as root and no postgres or nobody user to run PostgreSQL as")
        entry = pwd.getpwnam(user)
        os.chown(root, entry.pw_uid, entry.pw_gid)
        prefix = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
    data, port = root / "data", _free_port()
    run = dict(check=True, capture_output=True, text=True, timeout=120, cwd=root)
    try:
        subprocess.run(
            [*prefix, str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8"],
            **run,
        )
        # fsync off: a test server's data need not survive a power cut, and it spares a loaded machine.
        options = f"-p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={root} -c fsync=off"
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-l", str(root / "log"), "-w", "-t", "120"]
            + ["-o", options, "start"],
            **run,
        )
    except subprocess.CalledProcessError as exc:
        shutil.rmtree(root, ignore_errors=True)
        raise Unavailable(f"cannot start PostgreSQL: {exc.stderr.strip() or exc.stdout.strip()}") from None
    try:
        yield PostgresServer(f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres")
    finally:
        subprocess.run(
            [*prefix, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
            cwd=root,
        )
        time.sleep(0.1)
        shutil.rmtree(root, ignore_errors=True)


def _exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


@contextmanager
def postgres_server() -> Iterator[PostgresServer]:
    """The server of ``CISS_TEST_POSTGRES_URL``, else a throwaway cluster (raises :class:`Unavailable`)."""
    url = os.environ.get(URL_ENV)
    if url:
        yield PostgresServer(
            url if "+psycopg" in url else url.replace("postgresql://", "postgresql+psycopg://")
        )
        return
    try:
        import psycopg  # noqa: F401
    except ImportError:
        raise Unavailable("the psycopg driver is not installed: pip install -e '.[postgres]'") from None
    with throwaway_cluster() as server:
        yield server
