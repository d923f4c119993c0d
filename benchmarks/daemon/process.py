"""``ciss daemon`` as a process of its own, for the benchmarks that time a real daemon (ingest, idle).

Its output goes to ``daemon.log`` in the workspace; it is ready once it logs that it started.
"""

from __future__ import annotations

import contextlib
import signal
import subprocess
import time
from collections.abc import Iterator

from benchmarks.measure import cli
from ciss_daemon.workspace import Workspace

READY_LINE = "ciss daemon started on"


class DaemonProcess:
    """``ciss daemon`` on a workspace, in its own process, logging to ``daemon.log`` in the workspace."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.log_path = ws.root / "daemon.log"
        self.log = self.log_path.open("ab")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            cli("daemon", "--workspace", str(ws.root)), stdout=self.log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds from spawn until the daemon logs that it started (lock, catalog, recovery, timers)."""
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready after {timeout} s; see {self.log_path}")
            time.sleep(0.02)
        return time.perf_counter() - self.started

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL only if it does not stop in time. Returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        return self.process.returncode


@contextlib.contextmanager
def running_daemon(ws: Workspace) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(ws)
    try:
        yield daemon
    finally:
        daemon.stop()
