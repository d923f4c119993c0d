"""PostgreSQL only: one daemon per catalog across hosts (two processes, two workspaces, one database), the
lease that enforces it, and `ciss status` against PostgreSQL without torch. The catalog, migration and
reliability tests run on PostgreSQL too, parametrised over both backends (conftest.BACKENDS)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import DaemonProcess, new_workspace, settings_text, wait_for
from postgres import PostgresServer
from sqlalchemy.engine import make_url

from ciss_daemon.catalog import connection
from ciss_daemon.exceptions import DaemonRunningError

pytestmark = pytest.mark.postgres


def _started(ws_root: Path) -> bool:
    log = ws_root / "daemon.log"
    return log.exists() and "ciss daemon started" in log.read_text()


def _shown(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def test_the_lease_admits_one_holder_per_database_and_frees_it_on_release(postgres: PostgresServer) -> None:
    url, other = postgres.new_database(), postgres.new_database()
    first, second, elsewhere = (
        connection.DaemonLease(url),
        connection.DaemonLease(url),
        connection.DaemonLease(other),
    )
    first.acquire()
    try:
        with pytest.raises(DaemonRunningError) as caught:
            second.acquire()
        assert str(caught.value) == (
            f"a ciss daemon ({socket.gethostname()} pid {os.getpid()}) already uses the "
            f"catalog at {_shown(url)}; stop it first"
        )
        elsewhere.acquire()  # another database, another catalog: its own lease
    finally:
        first.release()
        elsewhere.release()
    second.acquire()
    second.release()


def test_the_lease_is_a_no_op_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'catalog.sqlite'}"
    first, second = connection.DaemonLease(url), connection.DaemonLease(url)
    first.acquire()
    second.acquire()  # the workspace's flock keeps daemons apart there
    first.release()
    second.release()


@pytest.mark.slow
def test_two_daemons_on_one_postgresql_catalog_one_runs_the_other_is_refused(
    tmp_path: Path, postgres: PostgresServer
) -> None:
    # Two workspaces stand for two hosts: their flocks are unrelated, only the catalog is shared.
    url = postgres.new_database()
    host_a = new_workspace(tmp_path / "a", settings_text(), catalog_url=url)
    host_b = new_workspace(tmp_path / "b", settings_text(), catalog_url=url)
    first = DaemonProcess(host_a)
    try:
        wait_for(lambda: _started(host_a.root), "the first daemon", timeout=120)
        refused = subprocess.run(
            [sys.executable, "-m", "ciss_daemon.cli", "daemon", "--workspace", str(host_b.root)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert refused.returncode == 1
        [line] = refused.stderr.strip().splitlines()  # one log line, no traceback
        assert line.endswith(
            f" ERROR ciss.daemon: a ciss daemon ({socket.gethostname()} pid {first.pid}) already uses the "
            f"catalog at {_shown(url)}; stop it first"
        )
        first.process.send_signal(signal.SIGKILL)  # the server drops a dead daemon's lease at once
        first.process.wait(60)
    finally:
        first.stop(signal.SIGKILL)
    second = DaemonProcess(host_b)
    try:
        wait_for(lambda: _started(host_b.root), "the second daemon", timeout=120)
    finally:
        assert second.stop() == 0


def test_status_against_postgresql_never_imports_torch(tmp_path: Path, postgres: PostgresServer) -> None:
    ws = new_workspace(tmp_path / "ws", settings_text(), catalog_url=postgres.new_database())
    script = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from ciss_daemon.cli import app\n"
        f"ws = {str(ws.root)!r}\n"
        "for args in (['status', '-w', ws], ['status', '--json', '-w', ws], ['classes', '-w', ws]):\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, result.output\n"
        "assert 'psycopg' in sys.modules, 'not read from PostgreSQL'\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
