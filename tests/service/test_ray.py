"""Training steps on a Ray cluster (``daemon.launcher = "ray"``): settings, the checks at start-up, and a
step trained by 2 CPU workers on gloo through the real daemon and a real Ray head on 127.0.0.1 (the
``ray_head`` fixture, tests/helpers/rayhead.py), stopped, resumed and promoted.

Tiny settings (ResNet-18, 32 x 32 crops, a few iterations), as tests/test_ranks.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from daemon_helpers import (
    DaemonProcess,
    catalog_rows,
    ciss,
    job_progress,
    new_workspace,
    settings_text,
    status,
    step_states,
    tiny_batch,
    wait_for,
    worker_pids,
)

from ciss_daemon.batch.inbox import submit_folder
from ciss_daemon.exceptions import ClusterError, SettingsError
from ciss_daemon.service import ray_launch
from ciss_daemon.service.jobs import Outcome, outcome_of
from ciss_daemon.service.launch import Launch, plan_launch, worker_command
from ciss_daemon.service.protocol import EXIT_RANK_LOST
from ciss_daemon.settings import parse_settings
from engine.checkpoint import load_checkpoint


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket closes


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ('[daemon]\nlauncher = "slurm"', "daemon.launcher: 'slurm' is not one of local, ray"),
        (
            '[ray]\naddress = "head"',
            'ray.address: \'head\' is not "auto" or the head\'s host:port, e.g. "10.0.0.1:6379"',
        ),
        ("[ray]\nworkers = 0", "ray.workers: 0 must be >= 1"),
        ("[ray]\ngpus_per_worker = -1", "ray.gpus_per_worker: -1 must be >= 0"),
        ("[ray]\ncpus_per_worker = 0", "ray.cpus_per_worker: 0 must be > 0"),
        ('[ray]\nplacement = "any"', "ray.placement: 'any' is not one of pack, spread, strict_spread"),
    ],
)
def test_bad_ray_settings_are_one_line_naming_the_key(toml: str, message: str) -> None:
    with pytest.raises(SettingsError) as caught:
        parse_settings(toml)
    assert str(caught.value) == f"ciss.toml: {message}"


def test_without_ray_installed_the_daemon_says_which_extra_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = parse_settings('[daemon]\nlauncher = "ray"\n[ray]\naddress = "127.0.0.1:6379"')
    monkeypatch.setattr(ray_launch, "ray_installed", lambda: False)
    with pytest.raises(ClusterError) as caught:
        plan_launch(settings.daemon, ray=settings.ray)
    assert str(caught.value) == (
        "daemon.launcher = \"ray\" needs Ray, which is not installed: pip install 'ciss[ray]'"
    )


def test_a_head_that_does_not_answer_is_named_with_how_to_start_one(monkeypatch: pytest.MonkeyPatch) -> None:
    port = _closed_port()
    settings = parse_settings(f'[daemon]\nlauncher = "ray"\n[ray]\naddress = "127.0.0.1:{port}"')
    monkeypatch.setattr(ray_launch, "ray_installed", lambda: True)
    with pytest.raises(ClusterError) as caught:
        plan_launch(settings.daemon, ray=settings.ray)
    assert str(caught.value) == (
        f"ray.address: no Ray head answers at 127.0.0.1:{port} (Connection refused); start one there with "
        f"`ray start --head --port={port}` or fix [ray] address in ciss.toml"
    )


def test_the_daemon_does_not_start_without_its_ray_head_and_says_so_in_one_line(tmp_path: Path) -> None:
    port = _closed_port()
    ws = new_workspace(tmp_path / "ws", _on_ray(f"127.0.0.1:{port}"))
    run = ciss(ws, "daemon", check=False)
    if ray_launch.ray_installed():
        expected = (
            f"ray.address: no Ray head answers at 127.0.0.1:{port} (Connection refused); start one there "
            f"with `ray start --head --port={port}` or fix [ray] address in ciss.toml"
        )
    else:
        expected = "daemon.launcher = \"ray\" needs Ray, which is not installed: pip install 'ciss[ray]'"
    assert run.returncode == 1
    assert run.stderr.strip().splitlines()[-1].endswith(f"ERROR ciss.daemon: {expected}"), run.stderr
    assert "Traceback" not in run.stderr


def test_the_ray_plan_starts_the_worker_module_through_the_supervisor(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = parse_settings(
        '[daemon]\nlauncher = "ray"\nrank_timeout_seconds = 30\n'
        '[ray]\naddress = "auto"\nworkers = 3\ngpus_per_worker = 2\ncpus_per_worker = 4'
    )
    monkeypatch.setattr(ray_launch, "ray_installed", lambda: True)
    launch = plan_launch(settings.daemon, ray=settings.ray)
    assert isinstance(launch, Launch) and (launch.ranks, launch.device) == (6, "cuda")
    assert launch.describe() == "6 processes on the Ray cluster at auto: 3 workers x 2 GPUs"
    command, env = worker_command(tmp_path, launch)
    assert command == [
        sys.executable,
        "-m",
        "ciss_daemon.service.ray_launch",
        "--address=auto",
        "--workers=3",
        "--gpus-per-worker=2",
        "--cpus-per-worker=4",
        "--placement=pack",
        "--start-timeout=600",
        "-m",
        "ciss_daemon.service.worker",
        str(tmp_path),
    ]
    assert env == {"CISS_RANK_TIMEOUT": "30.0"}


def test_a_supervisor_that_finds_no_head_ends_the_attempt_for_a_retry(tmp_path: Path) -> None:
    port = _closed_port()
    command = [
        sys.executable,
        "-m",
        "ciss_daemon.service.ray_launch",
        f"--address=127.0.0.1:{port}",
        "--workers=2",
    ]
    run = subprocess.run(
        [*command, "-m", "ciss_daemon.service.worker", str(tmp_path)], capture_output=True, timeout=120
    )
    reason = (
        f"ray.address: no Ray head answers at 127.0.0.1:{port} (Connection refused); start one there with "
        f"`ray start --head --port={port}` or fix [ray] address in ciss.toml"
    )
    assert run.returncode == EXIT_RANK_LOST
    assert json.loads((tmp_path / "exit.json").read_text()) == {"code": EXIT_RANK_LOST, "reason": reason}
    # What the daemon makes of it: a crashed attempt with that reason, retried from the checkpoint.
    assert outcome_of(tmp_path, run.returncode) == Outcome("crashed", reason)


def _on_ray(address: str, **overrides: object) -> str:
    values: dict[str, object] = {
        "daemon__device": "cpu",
        "daemon__launcher": "ray",
        "daemon__rank_timeout_seconds": 60.0,
        "ray__address": address,
        "ray__workers": 2,
        "ray__gpus_per_worker": 0,
        "ray__cpus_per_worker": 1,
        "ray__start_timeout_seconds": 120.0,
        "train__batch_size": 4,  # the total: 2 images per worker
    }
    return settings_text(**{**values, **overrides})


@pytest.mark.slow
def test_a_step_trains_on_2_ray_workers_stops_at_a_checkpoint_and_the_resume_is_promoted(
    tmp_path: Path, ray_head: str
) -> None:
    ws = new_workspace(
        tmp_path / "ws", _on_ray(ray_head, train__epochs_base=10, train__checkpoint_every=100)
    )  # 16 images, 4 a step: 4 iterations an epoch, 40 in all, so that the stop arrives before the end
    daemon = DaemonProcess(ws)
    try:
        submit_folder(tiny_batch(tmp_path / "data", 0, n_train=16, n_val=2), ws.inbox)
        wait_for(lambda: job_progress(ws, 1).get("iteration", 0) >= 2, "training on Ray", timeout=400)
        progress = job_progress(ws, 1)
        assert progress["ranks"] == 2 and progress["total"] == 40
        cluster = progress["cluster"]
        assert cluster["launcher"] == "ray" and cluster["address"] == ray_head and cluster["workers"] == 2
        running = status(ws)["running"]
        assert running["progress"]["cluster"] == cluster
        text = " ".join(ciss(ws, "status").stdout.split())  # however rich wraps the line
        assert f"on 2 processes, on the Ray cluster at {ray_head} (nodes " in text, text
        assert daemon.stop(signal.SIGTERM) == 0
    finally:
        daemon.stop(signal.SIGKILL)
    wait_for(lambda: worker_pids(ws) == [], "the supervisor and both ranks to exit", timeout=60)
    job = ws.jobs / "1"
    stopped_at = int(load_checkpoint(job / "checkpoint.pt")["position"]["iteration"])
    assert 2 <= stopped_at < 40  # written where the ranks stopped, not at an epoch end or every 100
    assert json.loads((job / "exit.json").read_text()) == {"code": 75, "reason": None}
    assert catalog_rows(ws, "SELECT state, attempts FROM jobs") == [("queued", 0)]
    # The supervisor's log says where each worker ran; each rank has its own log on the shared workspace.
    supervisor = (job / "worker.log").read_text()
    assert "worker 0 on " in supervisor and "worker 1 on " in supervisor, supervisor[-3000:]

    daemon = DaemonProcess(ws)
    try:
        wait_for(lambda: step_states(ws) == ["promoted"], "the resumed step", timeout=500)
    finally:
        assert daemon.stop() == 0
    for rank in (0, 1):
        log = (job / f"worker-rank{rank}.log").read_text()
        assert f"resuming from {job / 'checkpoint.pt'} at epoch" in log, log[-3000:]


@pytest.mark.slow
def test_a_daemon_killed_mid_step_on_ray_leaves_a_checkpoint_and_the_next_daemon_finishes_the_step(
    tmp_path: Path, ray_head: str
) -> None:
    ws = new_workspace(tmp_path / "ws", _on_ray(ray_head, train__epochs_base=10, train__checkpoint_every=100))
    daemon = DaemonProcess(ws)
    try:
        submit_folder(tiny_batch(tmp_path / "data", 0, n_train=16, n_val=2), ws.inbox)
        wait_for(lambda: job_progress(ws, 1).get("iteration", 0) >= 2, "training on Ray", timeout=400)
    finally:
        daemon.stop(signal.SIGKILL)
    # The supervisor dies with the daemon (parent-death signal): it stops the ranks on their nodes, which
    # agree on an iteration and checkpoint there, as on a stop.
    wait_for(lambda: worker_pids(ws) == [], "the supervisor and both ranks to exit", timeout=120)
    job = ws.jobs / "1"
    assert json.loads((job / "exit.json").read_text()) == {"code": 75, "reason": None}
    stopped_at = int(load_checkpoint(job / "checkpoint.pt")["position"]["iteration"])
    assert 2 <= stopped_at < 40

    daemon = DaemonProcess(ws)
    try:
        wait_for(lambda: step_states(ws) == ["promoted"], "the resumed step", timeout=500)
    finally:
        assert daemon.stop() == 0
    log = (job / "worker-rank0.log").read_text()
    assert f"resuming from {job / 'checkpoint.pt'} at epoch" in log, log[-3000:]
