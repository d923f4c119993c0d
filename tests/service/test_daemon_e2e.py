"""The daemon for real: `ciss daemon` as a process on a temporary workspace, tiny model and images."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import SETTINGS, DaemonProcess, ciss, states, status, wait_for

from ciss_daemon.batch.inbox import submit_folder
from ciss_daemon.catalog.connection import upgrade_catalog
from ciss_daemon.workspace import Workspace, init_workspace
from engine.synthetic import generate_batches

pytestmark = pytest.mark.slow


@pytest.fixture
def workspace(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Workspace]:
    options = {"epochs": 2, "floor": 0.0, "max_attempts": 3, **getattr(request, "param", {})}
    ws = init_workspace(tmp_path / "ws", settings_text=SETTINGS.format(**options))
    upgrade_catalog(f"sqlite:///{ws.catalog_path}", backup_dir=ws.backups)  # as `ciss init` does
    yield ws


@pytest.fixture
def batches(tmp_path: Path) -> list[Path]:
    return generate_batches(
        tmp_path / "data", "3-2-2", train_per_step=8, val_per_step=2, image_size=32, eval_batch=7, seed=3
    )


def test_three_batches_become_three_promoted_steps(workspace: Workspace, batches: list[Path]) -> None:
    *train, evaluation = batches
    daemon = DaemonProcess(workspace)
    try:
        submit_folder(evaluation, workspace.inbox)
        for folder in train:  # dropped by hand, as a user would: the daemon waits for them to settle
            shutil.copytree(folder, workspace.inbox / folder.name)
        wait_for(lambda: states(workspace) == ["promoted"] * 3, "3 promotions")
        data = status(workspace)
    finally:
        assert daemon.stop() == 0
    assert data["daemon"]["alive"] is True
    current = data["current"]
    assert current["version"] == "v0003" and current["step"] == 2
    assert [c["id"] for c in current["classes"]] == list(range(1, 8))
    assert set(current["metrics"]) == {"miou_all", "miou_old", "miou_new", "hiou", "paper"}
    assert all(0.0 <= current["metrics"][k] <= 1.0 for k in ("miou_all", "miou_old", "miou_new"))
    # The paper's grouping: old = background + step 0's classes, new = every later class.
    assert set(current["metrics"]["paper"]) == {"miou_old", "miou_new", "hiou"}
    assert [s["batch"] for s in data["steps"]] == [f.name for f in train]
    assert data["running"] is None and data["queue"] == []
    assert os.readlink(workspace.current) == "v0003"
    # Everything the user dropped is kept: archived originals, stored copies; the inbox is empty.
    assert sorted(p.name.rsplit("-", 1)[0] for p in workspace.archive.iterdir()) == sorted(
        f.name for f in batches
    )
    assert [p.name for p in workspace.inbox.iterdir() if not p.name.startswith(".")] == []
    # Stopped: status still answers, from the catalog alone.
    stopped = status(workspace)
    assert stopped["daemon"]["alive"] is False and stopped["current"]["version"] == "v0003"
    classes = json.loads(ciss(workspace, "classes", "--json").stdout)
    assert [c["taught"] for c in classes] == [True] * 7


@pytest.mark.parametrize("workspace", [{"epochs": 8}], indirect=True)
def test_kill_9_during_training_resumes_from_the_checkpoint(
    workspace: Workspace, batches: list[Path]
) -> None:
    daemon = DaemonProcess(workspace)
    submit_folder(batches[0], workspace.inbox)
    checkpoint = workspace.jobs / "1" / "checkpoint.pt"

    def trained_a_while() -> bool:
        running = status(workspace)["running"]
        return bool(running and (running["progress"].get("iteration") or 0) >= 5 and checkpoint.exists())

    wait_for(trained_a_while, "a checkpoint")
    daemon.stop(signal.SIGKILL)
    # The orphaned trainer notices its parent died, checkpoints and exits.
    job_dir = str(workspace.jobs / "1")
    wait_for(
        lambda: job_dir not in subprocess.run(["ps", "axww"], capture_output=True, text=True).stdout,
        "the orphaned trainer to stop",
        timeout=60,
    )
    assert states(workspace) == ["training"]  # what the killed daemon left
    daemon = DaemonProcess(workspace)
    try:
        wait_for(lambda: states(workspace) == ["promoted"], "the resumed step")
        data = status(workspace)
    finally:
        assert daemon.stop() == 0
    assert len(data["steps"]) == 1 and data["current"]["version"] == "v0001"
    log = (workspace.jobs / "1" / "worker.log").read_text()
    assert "resuming from" in log and "at epoch 0, iteration 0" not in log
    messages = [e["message"] for e in data["events"]]
    assert any("the daemon restarted during training" in m for m in messages)


@pytest.mark.parametrize("workspace", [{"floor": 1.0}], indirect=True)
def test_a_held_step_waits_for_the_operator(workspace: Workspace, batches: list[Path]) -> None:
    daemon = DaemonProcess(workspace)
    try:
        submit_folder(batches[0], workspace.inbox)
        submit_folder(batches[1], workspace.inbox)
        wait_for(lambda: states(workspace)[:1] == ["held"], "the held step")
        time.sleep(2)  # the daemon keeps running; nothing moves without the operator
        data = status(workspace)
        assert [s["state"] for s in data["steps"]] == ["held", "queued"]
        assert data["current"] is None and "below the floor" in data["steps"][0]["reason"]
        assert "v0001 (step 0) is now the current model" in ciss(workspace, "promote").stdout
        wait_for(lambda: states(workspace)[1:] == ["held"], "the second step")
        refused = ciss(workspace, "promote", "v0001", check=False)
        assert refused.returncode == 1
        assert refused.stderr.strip() == "Error: step 0 is promoted; only a held step is promoted"
        assert "discarded" in ciss(workspace, "discard").stdout
    finally:
        assert daemon.stop() == 0
    data = status(workspace)
    assert [s["state"] for s in data["steps"]] == ["promoted", "discarded"]
    assert data["current"]["version"] == "v0001"
