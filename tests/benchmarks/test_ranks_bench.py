"""Several training processes per step, through the real daemon: 2 CPU ranks on gloo under
``torch.distributed.run`` (``daemon.cpu_ranks = 2``), as several GPUs run on NCCL.

Tiny settings (ResNet-18, 32 x 32 crops, a few iterations) keep each test within a minute or two on two
shared cores.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
from daemon_helpers import (
    DaemonProcess,
    catalog_rows,
    ciss,
    job_progress,
    new_workspace,
    record_figure,
    settings_text,
    status,
    step_states,
    tiny_batch,
    wait_for,
    worker_pids,
)

from ciss_daemon.batch.inbox import submit_folder
from ciss_daemon.workspace import Workspace
from engine.checkpoint import load_checkpoint

# Largest difference allowed between a weight trained by 2 ranks and by 1 process with the same total
# batch: DDP averages the two ranks' gradients, a single process sums the same per-image terms in another
# order, so the float32 results differ by rounding only (measured: 4e-9 after 8 iterations, while the
# step moved weights by up to 8e-3).
TOLERANCE = 1e-6
LOST = "one of the 2 training processes of this step died or stopped answering ("


def _two_ranks(**overrides: object) -> str:
    values: dict[str, object] = {
        "daemon__device": "cpu",
        "daemon__cpu_ranks": 2,
        "daemon__rank_timeout_seconds": 60.0,
        "train__batch_size": 4,  # the total: 2 images per rank
    }
    return settings_text(**{**values, **overrides})


def _ranks(ws: Workspace) -> dict[int, int]:
    """RANK -> pid of the workspace's training ranks (the launcher has no RANK)."""
    found = {}
    for pid in worker_pids(ws):
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for entry in environ:
            if entry.startswith(b"RANK="):
                found[int(entry[5:])] = pid
    return found


@pytest.mark.slow
def test_sigterm_mid_step_stops_every_rank_at_one_checkpoint_and_the_resume_finishes(tmp_path: Path) -> None:
    ws = new_workspace(
        tmp_path / "ws", _two_ranks(train__epochs_base=30, train__checkpoint_every=1000)
    )  # 16 images, 4 a step: 4 iterations an epoch, 120 in all, so SIGTERM comes before the end (40 were
    # over before it on a box loaded by other training runs)
    daemon = DaemonProcess(ws)
    try:
        submit_folder(tiny_batch(tmp_path / "data", 0, n_train=16, n_val=2), ws.inbox)
        wait_for(lambda: job_progress(ws, 1).get("iteration", 0) >= 2, "training on 2 ranks", timeout=300)
        progress = job_progress(ws, 1)
        assert len(_ranks(ws)) == 2
        # One report for the whole job: the total batch's iterations, and the images of both ranks.
        assert progress["ranks"] == 2 and progress["total"] == 120
        running = status(ws)["running"]
        assert running["progress"]["ranks"] == 2
        # On a loaded machine the 120 iterations may be over by now: the ETA exists while training runs.
        assert running["eta_seconds"] is not None or running["progress"].get("phase") != "training"
        assert "on 2 processes" in " ".join(ciss(ws, "status").stdout.split())  # however rich wraps the line
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.stop(signal.SIGKILL)
    assert worker_pids(ws) == []  # the launcher and both ranks are gone
    job = ws.jobs / "1"
    stopped_at = int(load_checkpoint(job / "checkpoint.pt")["position"]["iteration"])
    assert 2 <= stopped_at < 120  # written where the ranks stopped, not at an epoch end or every 1000
    assert json.loads((job / "exit.json").read_text()) == {"code": 75, "reason": None}
    assert list(job.glob(".*.tmp")) == []
    assert catalog_rows(ws, "SELECT state, attempts FROM jobs") == [("queued", 0)]

    daemon = DaemonProcess(ws)
    try:
        wait_for(lambda: step_states(ws) == ["promoted"], "the resumed step", timeout=400)
    finally:
        assert daemon.stop() == 0
    log = (job / "worker.log").read_text()
    # Both ranks resumed from the one checkpoint.
    assert log.count(f"resuming from {job / 'checkpoint.pt'} at epoch") == 2, log[-3000:]
    record_figure("ranks_sigterm_resume", ranks=2, stopped_at=stopped_at)


@pytest.mark.slow
def test_a_step_trained_by_2_ranks_equals_1_process_with_the_same_total_batch(tmp_path: Path) -> None:
    # Step 1 is compared: from step 1 on BatchNorm is frozen and dropout off, so the step is the same
    # computation however the batch is split (step 0 trains BatchNorm, whose statistics are per rank on
    # the CPU, where SyncBatchNorm does not run).
    ws = new_workspace(tmp_path / "ws", _two_ranks(train__epochs_base=1, train__epochs_incremental=2))
    daemon = DaemonProcess(ws)
    try:
        submit_folder(tiny_batch(tmp_path / "data", 0, n_train=8, n_val=2), ws.inbox)
        wait_for(lambda: step_states(ws) == ["promoted"], "step 0", timeout=400)
        submit_folder(tiny_batch(tmp_path / "data", 1, n_train=16, n_val=2), ws.inbox)
        wait_for(lambda: step_states(ws) == ["promoted", "promoted"], "step 1", timeout=400)
    finally:
        assert daemon.stop() == 0
    [(version, path)] = catalog_rows(ws, "SELECT version, path FROM model_versions WHERE is_current")

    # The same request in one plain process (the daemon's single-process command), total batch 4.
    reference = tmp_path / "reference"
    reference.mkdir()
    request = json.loads((ws.jobs / "2" / "request.json").read_text())
    assert request["ranks"] == 2 and request["config"]["train"]["batch_size"] == 4
    request.update(workdir=str(reference), output_dir=str(reference / "candidate"), ranks=1)
    (reference / "request.json").write_text(json.dumps(request))
    env = {k: v for k, v in os.environ.items() if k != "CISS_PARENT_PID"}
    command = [sys.executable, "-m", "ciss_daemon.service.worker", str(reference)]
    run = subprocess.run(command, env=env, capture_output=True, timeout=900)  # slow on a loaded box
    assert run.returncode == 0, run.stdout[-2000:]
    by_two = safetensors.torch.load_file(Path(path) / "model.safetensors")
    by_one = safetensors.torch.load_file(reference / "candidate" / "model.safetensors")
    assert by_two.keys() == by_one.keys()
    teacher = safetensors.torch.load_file(ws.models / "v0001" / "model.safetensors")
    moved = max(
        float((by_two[k].double() - w.double()).abs().max())
        for k, w in teacher.items()
        if w.shape == by_two[k].shape  # the classifiers grew a channel for the new class
    )
    worst = max(float((by_two[k].double() - by_one[k].double()).abs().max()) for k in by_one)
    assert moved > 1000 * TOLERANCE  # the step did train: the comparison is not between two copies
    assert worst <= TOLERANCE, worst
    record_figure("ranks_equal_one_process", version=version, max_abs_diff=worst, moved=moved)


@pytest.mark.slow
def test_a_rank_that_dies_ends_the_attempt_and_the_retry_resumes(tmp_path: Path) -> None:
    ws = new_workspace(
        tmp_path / "ws", _two_ranks(train__epochs_base=3, train__checkpoint_every=2, daemon__max_attempts=3)
    )
    daemon = DaemonProcess(ws)
    try:
        submit_folder(tiny_batch(tmp_path / "data", 0, n_train=16, n_val=2), ws.inbox)
        wait_for(lambda: job_progress(ws, 1).get("iteration", 0) >= 3, "training on 2 ranks", timeout=300)
        os.kill(_ranks(ws)[1], signal.SIGKILL)  # rank 1 dies; rank 0 waits for it in a collective
        killed = time.monotonic()
        wait_for(
            lambda: catalog_rows(ws, "SELECT attempts, state FROM jobs")[0] != (1, "running"),
            "the attempt to end",
            timeout=120,
        )
        ended = time.monotonic() - killed
        error = catalog_rows(ws, "SELECT error FROM jobs")[0][0]
        wait_for(lambda: step_states(ws) == ["promoted"], "the retried step", timeout=400)
    finally:
        assert daemon.stop() == 0
    assert ended < 60  # well within daemon.rank_timeout_seconds: a dead peer is noticed at once
    assert error.startswith(LOST), error
    assert catalog_rows(ws, "SELECT attempts, state FROM jobs") == [(2, "done")]
    assert "resuming from" in (ws.jobs / "1" / "worker.log").read_text()
    record_figure("ranks_rank_killed", seconds_to_end_attempt=round(ended, 1))


@pytest.mark.slow
def test_a_rank_that_hangs_ends_the_attempt_within_the_rank_timeout(tmp_path: Path) -> None:
    timeout = 15.0
    ws = new_workspace(
        tmp_path / "ws",
        _two_ranks(daemon__rank_timeout_seconds=timeout, daemon__max_attempts=1, train__epochs_base=3),
    )
    daemon = DaemonProcess(ws)
    try:
        submit_folder(tiny_batch(tmp_path / "data", 0, n_train=16, n_val=2), ws.inbox)
        wait_for(lambda: job_progress(ws, 1).get("iteration", 0) >= 2, "training on 2 ranks", timeout=300)
        hung = _ranks(ws)[1]
        os.kill(hung, signal.SIGSTOP)  # alive but silent: rank 0 waits for it in the next collective
        stopped = time.monotonic()
        wait_for(lambda: step_states(ws) == ["failed"], "the attempt to end", timeout=timeout + 120)
        ended = time.monotonic() - stopped
    finally:
        assert daemon.stop() == 0
    # The rank timeout, the launcher's 30 s grace before it kills the silent rank, the daemon's next poll
    # (slow on a loaded machine), and no more: nothing waits forever.
    assert timeout <= ended < timeout + 150, ended
    assert worker_pids(ws) == []  # the stopped rank was killed, not left holding its device
    [(reason,)] = catalog_rows(ws, "SELECT reason FROM steps")
    assert reason.startswith(LOST), reason
    # gloo words a silent peer as "Timed out waiting 15000ms ..." or "Application timeout caused pair
    # closure", depending on which side of the connection times out first.
    assert "Timed out waiting 15000ms" in reason or "timeout caused pair closure" in reason, reason
    assert reason.endswith("); gave up after 1 attempts"), reason
    record_figure("ranks_rank_hung", rank_timeout=timeout, seconds_to_end_attempt=round(ended, 1))
