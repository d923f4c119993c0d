"""Crashes and stops: kill -9 at random moments, a training child killed again and again, SIGTERM.

The slow tests run the real `ciss daemon` on a temporary workspace with a tiny model. Moments that are
too short to hit by chance (inside a checkpoint write, between the pointer swap and the catalog commit,
between copying a batch and recording it) are widened by tests/helpers/faults: the process pauses there and
the test kills it with SIGKILL, as a power cut or the OOM killer would. The kill -9 test runs on both
catalog backends, SQLite and PostgreSQL. After every kill the workspace
is checked as the crash left it, then again after a restart's recovery (``Daemon.start``), with
``daemon_helpers.integrity_problems``. ``CISS_FAULT_ROUNDS`` raises the number of kills (default: one
of each kind); ``CISS_FAULT_SEED`` picks other random moments.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from daemon_helpers import (
    DaemonProcess,
    FakeClock,
    catalog_rows,
    fault_rounds,
    in_process_daemon,
    inbox_names,
    integrity_problems,
    kill_workers,
    new_workspace,
    record_figure,
    settings_text,
    step_states,
    tiny_batch,
    wait_for,
    wait_workers_gone,
    worker_pids,
)

from ciss_daemon.batch.inbox import submit_folder
from ciss_daemon.workspace import Workspace
from engine.checkpoint import load_checkpoint

CHECKPOINT_EVERY = 3


def _busy_steps(ws: Workspace) -> int:
    query = "SELECT count(*) FROM steps WHERE state IN ('accepted', 'queued', 'training', 'evaluating')"
    return catalog_rows(ws, query)[0][0]


def _running_job(ws: Workspace) -> int | None:
    rows = catalog_rows(ws, "SELECT id FROM jobs WHERE state = 'running'")
    return rows[0][0] if rows else None


def _progress(ws: Workspace, job: int) -> tuple[int, float]:
    """(iteration, mtime) of a job's last progress report; (0, 0) before the first."""
    path = ws.jobs / str(job) / "progress.json"
    try:
        data = json.loads(path.read_text())
        return int(data.get("iteration") or 0), path.stat().st_mtime
    except (OSError, ValueError):
        return 0, 0.0


def _checkpoint_iteration(ws: Workspace, job: int) -> int:
    path = ws.jobs / str(job) / "checkpoint.pt"
    return int(load_checkpoint(path)["position"]["iteration"]) if path.exists() else 0


def _leftovers(ws: Workspace) -> list[str]:
    """Temporary files or folders a crash left and recovery should have removed."""
    found = [*ws.jobs.glob("*/.*.tmp"), *ws.models.glob(".*.tmp"), *ws.models.glob("*/.*.tmp")]
    found += [p for p in ws.store.glob(".*") if p.is_dir()]
    return [str(p) for p in found]


def _recover(ws: Workspace) -> None:
    """What a restart does before anything else (``Daemon.start``: recovery), then stop again."""
    daemon = in_process_daemon(ws, FakeClock())
    daemon.shutdown()
    daemon.factory.kw["bind"].dispose()


# --- 2. a training child killed again and again -------------------------------------------------------------


def test_a_training_child_killed_again_and_again_fails_its_step_after_max_attempts(tmp_path: Path) -> None:
    ws = new_workspace(tmp_path / "ws", settings_text(daemon__settle_seconds=0.0, daemon__max_attempts=3))
    clock = FakeClock()
    rng = random.Random(int(os.environ.get("CISS_FAULT_SEED", "7")))
    daemon = in_process_daemon(ws, clock)
    try:
        submit_folder(tiny_batch(tmp_path / "data", 0), ws.inbox)
        killed = 0
        for attempt in range(1, 4):
            daemon.tick(clock.advance(1.0))
            assert daemon.process is not None, f"attempt {attempt} did not start"
            assert catalog_rows(ws, "SELECT attempts FROM jobs") == [(attempt,)]
            time.sleep(rng.uniform(0.0, 1.5))  # a random moment of its start-up or training
            os.kill(daemon.process.pid, signal.SIGKILL)
            daemon.process.process.wait()
            killed += 1
        for _ in range(10):  # nothing starts again, however long the daemon goes on
            daemon.tick(clock.advance(60.0))
            assert daemon.process is None and worker_pids(ws) == []
    finally:
        daemon.shutdown()
    reason = "the training process was killed by SIGKILL; gave up after 3 attempts"
    assert catalog_rows(ws, "SELECT state, reason FROM steps") == [("failed", reason)]
    assert catalog_rows(ws, "SELECT state, attempts, error FROM jobs") == [("failed", 3, reason)]
    events = [row[0] for row in catalog_rows(ws, "SELECT message FROM events WHERE kind = 'failed'")]
    assert events == [f"step 0 failed: {reason}"]
    assert integrity_problems(ws, at_rest=True) == []
    record_figure("child_killed", kills=killed, attempts=3, outcome="failed with reason")


# --- 1. kill -9 at random moments ---------------------------------------------------------------------------

KINDS = ("ingest", "training-daemon", "training-box", "checkpoint", "promotion")


def _faults(kind: str, rng: random.Random, marker: Path) -> list[dict]:
    """Where to pause the daemon or its child so that the kill lands inside the chosen moment."""
    when = rng.choice(["before", "after"])
    pause = {"action": "pause", "when": when, "marker": str(marker), "seconds": 600, "times": 1}
    if kind == "checkpoint":
        op, match = rng.choice([("replace", r"checkpoint\.pt$"), ("fsync", r"\.checkpoint\.pt\..*\.tmp$")])
        return [{**pause, "op": op, "match": match, "process": "worker", "skip": rng.randint(0, 2)}]
    if kind == "promotion":
        op, match = rng.choice(
            [("replace", r"models/current$"), ("rename", r"/candidate -> .*/models/v\d+$")]
        )
        return [{**pause, "op": op, "match": match, "process": "daemon"}]
    if kind == "ingest":
        match = rng.choice([r"/store/\.[^/]* -> .*/store/", r"/inbox/[^/]* -> .*/archive/"])
        return [{**pause, "op": "rename", "match": match, "process": "daemon"}]
    return []


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_a_sound_workspace_that_finishes_the_work(
    tmp_path: Path, workspace_catalog: str | None
) -> None:
    rounds = fault_rounds(1) * len(KINDS)
    rng = random.Random(int(os.environ.get("CISS_FAULT_SEED", "7")))
    text = settings_text(
        daemon__max_attempts=1000,  # every kill of the daemon counts as an attempt of the running job
        daemon__settle_seconds=0.3,
        daemon__rescan_seconds=0.5,
        train__epochs_base=2,
        train__epochs_incremental=1,
        train__batch_size=2,
        train__checkpoint_every=CHECKPOINT_EVERY,
    )
    ws = new_workspace(tmp_path / "ws", text, catalog_url=workspace_catalog)
    submitted: list[str] = []

    def submit_next() -> None:
        folder = tiny_batch(tmp_path / "data", len(submitted), n_train=16, n_val=2)
        submit_folder(folder, ws.inbox)
        submitted.append(folder.name)

    kills, missed, redone, took = {kind: 0 for kind in KINDS}, 0, [], []
    for number in range(rounds):
        kind = KINDS[number % len(KINDS)]
        round_started = time.monotonic()
        if kind != "ingest" and not _busy_steps(ws) and not inbox_names(ws):
            submit_next()
        hit, job, reached = _kill_at_the_moment(ws, kind, tmp_path / f"marker-{number}", rng, submit_next)
        kills[kind] += hit
        missed += not hit
        wait_workers_gone(ws)  # a child whose daemon died checkpoints and exits by itself
        if kind in ("training-daemon", "training-box", "checkpoint") and job is not None:
            redone.append((kind, max(0, reached - _checkpoint_iteration(ws, job))))
        _assert_sound_after_the_kill(ws, f"round {number} ({kind})", submitted)
        took.append((kind, round(time.monotonic() - round_started, 1)))

    _assert_the_work_finishes(ws, submitted, redone)
    record_figure(
        "kill_9",
        kills=kills,
        missed=missed,
        steps=len(submitted),
        iterations_redone=redone,
        checkpoint_every=CHECKPOINT_EVERY,
        seconds_per_round=took,
    )


def _kill_at_the_moment(
    ws: Workspace, kind: str, marker: Path, rng: random.Random, submit_next: Callable[[], None]
) -> tuple[bool, int | None, int]:
    """One round: a daemon paused at the ``kind`` moment (or training), then killed with SIGKILL, its
    child too unless only the daemon dies. Whether the moment was hit, the job running, its iteration."""
    daemon = DaemonProcess(ws, faults=_faults(kind, rng, marker))
    try:
        if kind == "ingest":
            submit_next()
        job = _wait_for_the_moment(ws, kind, marker, rng)
        # The moment may have passed (the step ended first, no checkpoint was left to write): the
        # kill still happens, at whatever the daemon was doing, and is counted apart.
        hit = _running_job(ws) == job if kind.startswith("training") else any(marker.glob("*.json"))
        reached = _progress(ws, job)[0] if job is not None else 0
        if kind != "training-daemon":  # a crash of the whole box: the child dies with it
            kill_workers(ws)
        daemon.process.send_signal(signal.SIGKILL)
        daemon.process.wait(60)
    finally:
        daemon.stop(signal.SIGKILL)
    return hit, job, reached


def _wait_for_the_moment(ws: Workspace, kind: str, marker: Path, rng: random.Random) -> int | None:
    """Wait until training has reported (then a random pause, or the next report for a crash of the whole
    box) or until the daemon paused at the fault's moment; the job running then."""
    if kind.startswith("training"):
        wait_for(
            lambda: (job := _running_job(ws)) is not None and _progress(ws, job)[0] >= 1,
            "training",
            timeout=180,
        )
        job = _running_job(ws)
        time.sleep(rng.uniform(0.0, 1.0))
        if kind == "training-box":  # just after a progress report, to know how far it had got
            _, seen = _progress(ws, job)
            wait_for(
                lambda j=job, t=seen: _progress(ws, j)[1] != t or _running_job(ws) != j,
                "a progress report",
                timeout=60,
            )
        return job
    wait_for(
        lambda m=marker: any(m.glob("*.json")) or (not _busy_steps(ws) and not inbox_names(ws)),
        f"the {kind} moment",
        timeout=240,
    )
    return _running_job(ws)


def _assert_sound_after_the_kill(ws: Workspace, when: str, submitted: list[str]) -> None:
    """The workspace as the kill left it and after a restart's recovery: sound, no leftovers, and every
    submitted batch recorded or still in the inbox."""
    assert integrity_problems(ws, at_rest=False) == [], f"after the kill of {when}"
    _recover(ws)
    assert integrity_problems(ws, at_rest=True) == [], f"after recovery in {when}"
    assert _leftovers(ws) == []
    recorded = {row[0] for row in catalog_rows(ws, "SELECT name FROM batches")}
    lost = set(submitted) - recorded - set(inbox_names(ws))
    assert not lost, f"batches neither recorded nor in the inbox after {when}: {lost}"


def _assert_the_work_finishes(ws: Workspace, submitted: list[str], redone: list[tuple[str, int]]) -> None:
    """Without faults the daemon finishes every step: nothing was lost or recorded twice, and no kill cost
    more than the iterations since the last checkpoint."""
    daemon = DaemonProcess(ws)
    try:
        wait_for(lambda: not _busy_steps(ws) and not inbox_names(ws), "the remaining steps", timeout=600)
    finally:
        assert daemon.stop() == 0
    assert integrity_problems(ws, at_rest=True) == [] and _leftovers(ws) == []
    assert step_states(ws) == ["promoted"] * len(submitted)
    assert sorted(row[0] for row in catalog_rows(ws, "SELECT name FROM batches")) == sorted(submitted)
    last = catalog_rows(ws, "SELECT version FROM model_versions WHERE is_current")[0][0]
    assert os.readlink(ws.current) == last
    assert "database is locked" not in (ws.root / "daemon.log").read_text()
    assert all(n <= CHECKPOINT_EVERY for _, n in redone), redone
    # A child whose daemon alone died checkpoints before it exits: nothing to redo.
    assert all(n == 0 for kind, n in redone if kind == "training-daemon"), redone


# --- 3 and 11. SIGTERM: checkpoint, exit in time, resume to the same weights ---------------------------


@pytest.mark.slow
def test_sigterm_checkpoints_exits_in_time_and_resumes_to_the_weights_of_an_uninterrupted_run(
    tmp_path: Path,
) -> None:
    stop_timeout = 60.0
    text = settings_text(
        daemon__stop_timeout_seconds=stop_timeout,
        train__epochs_base=3,
        train__batch_size=2,
        train__checkpoint_every=5,
    )
    ws = new_workspace(tmp_path / "ws", text)
    daemon = DaemonProcess(ws)
    try:
        submit_folder(tiny_batch(tmp_path / "data", 0, n_train=16, n_val=2), ws.inbox)
        wait_for(lambda: _progress(ws, 1)[0] >= 4, "training", timeout=180)
        started = time.monotonic()
        code = daemon.stop(signal.SIGTERM)
        took = time.monotonic() - started
    finally:
        daemon.stop(signal.SIGKILL)
    assert code == 0 and took < stop_timeout and worker_pids(ws) == []
    stopped_at = _checkpoint_iteration(ws, 1)
    assert stopped_at >= 4  # the child wrote a checkpoint where it stopped, not only every 5 iterations
    # The stop is not a failed attempt: the job waits to resume.
    assert catalog_rows(ws, "SELECT state, attempts FROM jobs") == [("queued", 0)]
    assert step_states(ws) == ["queued"]

    daemon = DaemonProcess(ws)
    try:
        wait_for(lambda: step_states(ws) == ["promoted"], "the resumed step", timeout=300)
    finally:
        assert daemon.stop() == 0
    log = (ws.jobs / "1" / "worker.log").read_text()
    assert f"iteration {stopped_at}" in log and "resuming from" in log

    # The same request, uninterrupted, in a job folder of its own.
    reference = tmp_path / "reference"
    reference.mkdir()
    request = json.loads((ws.jobs / "1" / "request.json").read_text())
    request.update(workdir=str(reference), output_dir=str(reference / "candidate"))
    (reference / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k != "CISS_PARENT_PID"}
    run = subprocess.run(
        [sys.executable, "-m", "ciss_daemon.service.worker", str(reference)],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-2000:]
    resumed = safetensors.torch.load_file(ws.current / "model.safetensors")
    whole = safetensors.torch.load_file(reference / "candidate" / "model.safetensors")
    assert resumed.keys() == whole.keys()
    worst = max(float((resumed[k].double() - whole[k].double()).abs().max()) for k in whole)
    # Deterministic CPU training resumes bit for bit; the tolerance only absorbs a different BLAS path.
    assert worst <= 1e-6, worst
    assert all(torch.equal(resumed[k], whole[k]) for k in whole) or worst <= 1e-6
    record_figure("sigterm_resume", stop_seconds=round(took, 2), stopped_at=stopped_at, max_abs_diff=worst)
    shutil.rmtree(reference)
