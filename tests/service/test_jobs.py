"""Supervision of the training child: a stop that outlasts stop_timeout_seconds, and slow iterations."""

from __future__ import annotations

import hashlib
import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_helpers import FakeClock, in_process_daemon, new_workspace, settings_text
from sqlalchemy.orm import Session

from ciss_daemon.catalog import connection
from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.tables import Job
from ciss_daemon.service.jobs import TrainingProcess
from ciss_daemon.workspace import Workspace

# A child that ignores SIGTERM while it writes a checkpoint's temporary file, as a slow iteration would.
STUBBORN = """
import signal, sys, time, pathlib
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path(sys.argv[1], ".checkpoint.pt.1234.tmp").write_bytes(b"x" * 1000)
pathlib.Path(sys.argv[1], "ready").touch()
time.sleep(60)
"""
REASON = (
    "training did not checkpoint within daemon.stop_timeout_seconds (0.5 s) and was killed "
    "(raise the timeout above the time of one iteration)"
)


def running_job(s: Session, ws: Workspace) -> Job:
    """The job of step 0, started as pid 1 (a stand-in: no process runs)."""
    batch = catalog.record_batch(
        session=s,
        name="b",
        kind="train",
        sha256=hashlib.sha256(b"b").hexdigest(),
        store_path=ws.store / "b",
        class_names={1: "bike"},
        n_train=2,
        n_val=0,
    )
    job = catalog.create_job(
        session=s, step=catalog.create_step(session=s, batch=batch), max_attempts=3, jobs_dir=ws.jobs
    )
    catalog.start_job(session=s, job=job, pid=1)
    return job


def stubborn_child(job_dir: Path) -> TrainingProcess:
    job_dir.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen([sys.executable, "-c", STUBBORN, str(job_dir)])
    deadline = time.monotonic() + 30
    while not (job_dir / "ready").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return TrainingProcess(job_dir, process)


def test_a_stop_past_the_timeout_kills_says_so_and_leaves_no_temp_file(tmp_path: Path) -> None:
    child = stubborn_child(tmp_path / "job")
    outcome = child.stop(0.5)
    assert (outcome.kind, outcome.reason, outcome.timed_out) == ("crashed", REASON, True)
    assert list((tmp_path / "job").glob(".*.tmp")) == []


def test_the_daemon_logs_the_timeout_and_puts_it_in_the_steps_note(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws = new_workspace(tmp_path / "ws", settings_text(daemon__stop_timeout_seconds=0.5))
    daemon = in_process_daemon(ws, FakeClock())
    with connection.transaction(daemon.factory) as s:
        job = running_job(s, ws)
        job_id, job_dir = job.id, Path(job.workdir)
    daemon.process, daemon.process_job_id = stubborn_child(job_dir), job_id
    with caplog.at_level(logging.WARNING, logger="ciss.daemon"):
        daemon.shutdown()
    assert f"job {job_id}: {REASON}" in caplog.messages
    with daemon.factory() as s:
        job = s.get(Job, job_id)
        assert (job.state, job.step.state, job.step.reason) == ("queued", "queued", REASON)
        assert job.attempts == 0  # a stop is not a failed attempt


def test_an_iteration_longer_than_the_stop_timeout_is_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ws = new_workspace(tmp_path / "ws", settings_text(daemon__stop_timeout_seconds=60.0))
    daemon = in_process_daemon(ws, FakeClock())
    try:
        with connection.transaction(daemon.factory) as s:
            job = running_job(s, ws)
            with caplog.at_level(logging.WARNING, logger="ciss.daemon"):
                for _ in range(2):  # batch 4 at 0.04 images/s: 100 s per iteration
                    daemon.warn_if_stop_would_kill(s, job, {"images_per_second": 0.04}, 0.0)
    finally:
        daemon.shutdown()
    warnings = [r for r in caplog.records if r.name == "ciss.daemon" and r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in warnings] == [
        "step 0: one iteration takes about 100 s, longer than daemon.stop_timeout_seconds (60 s): a stop "
        "would kill training and lose the work since its last checkpoint; raise the timeout (and the unit's "
        "TimeoutStopSec) or train with smaller settings"
    ]


def test_a_resumed_attempt_is_logged_with_its_iteration(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from types import SimpleNamespace

    from ciss_daemon.service.protocol import PROGRESS
    from ciss_daemon.service.worker import ProgressWriter

    ws = new_workspace(tmp_path / "ws", settings_text())
    clock = FakeClock()
    daemon = in_process_daemon(ws, clock)
    try:
        with connection.transaction(daemon.factory) as s:
            job = running_job(s, ws)
            job_id, job_dir = job.id, Path(job.workdir)
        job_dir.mkdir(parents=True, exist_ok=True)
        writer = ProgressWriter(job_dir / PROGRESS)
        for iteration in (6, 7):  # the checkpoint held 5 iterations
            writer(
                SimpleNamespace(
                    iteration=iteration,
                    total_iterations=20,
                    epoch=1,
                    epochs=4,
                    losses={"total": 1.0},
                    lr=0.1,
                    images_per_second=50.0,
                    eta_seconds=3.0,
                )
            )
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
        daemon.process, daemon.process_job_id = TrainingProcess(job_dir, sleeper), job_id
        with caplog.at_level(logging.INFO, logger="ciss.daemon"):
            daemon.record_progress(clock.now)
            daemon.record_progress(clock.advance(100.0))
    finally:
        daemon.shutdown()
    assert [m for m in caplog.messages if "resumed" in m] == ["step 0 training resumed at iteration 5"]


def test_the_daemon_writes_a_log_file_in_the_workspace_unless_under_systemd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ciss_daemon.service.daemon import run_daemon
    from ciss_daemon.service.systemd import InstanceLock
    from ciss_daemon.settings import load_settings

    ws = new_workspace(tmp_path / "ws", settings_text())
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    lock = InstanceLock(ws.lock_path)
    lock.acquire()  # the daemon stops at once with an error line
    try:
        monkeypatch.delenv("INVOCATION_ID", raising=False)
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
        assert run_daemon(ws, load_settings(ws.settings_path)) == 1
        logged = ws.log_path.read_text(encoding="utf-8")
        assert "ERROR ciss.daemon: a ciss daemon (pid" in logged
        ws.log_path.unlink()
        monkeypatch.setenv("INVOCATION_ID", "0123")
        assert run_daemon(ws, load_settings(ws.settings_path)) == 1
        assert not ws.log_path.exists()  # journald keeps the log
    finally:
        lock.release()
        for handler in root.handlers:
            if handler not in handlers:
                handler.close()
        root.handlers[:], root.level = handlers, level
