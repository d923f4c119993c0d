"""`ciss status`: user strings shown as written, why a queued step waits, and a ciss.toml that broke."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest
from rich.console import Console
from status_helpers import NOON, add_steps, factory_of, runner, snapshot_of

from ciss_daemon import views
from ciss_daemon.catalog import connection
from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.listings import model_rows
from ciss_daemon.cli import app
from ciss_daemon.service.systemd import InstanceLock
from ciss_daemon.settings import parse_settings
from ciss_daemon.workspace import Workspace, find_workspace


@pytest.fixture
def ws(tmp_path: Path) -> Workspace:
    assert runner.invoke(app, ["init", str(tmp_path / "ws"), "--profile", "cpu"]).exit_code == 0
    return find_workspace(tmp_path / "ws")


def rendered(data: dict, ws: Workspace) -> str:
    console = Console(record=True, width=250)
    console.print(views.render(data, ws))
    return console.export_text()


def test_names_and_reasons_with_brackets_are_shown_as_written(ws: Workspace) -> None:
    with connection.transaction(factory_of(ws)) as s:
        catalog.record_rejection(
            session=s,
            batch_name="[bold]bikes",
            reasons=["mask value 7 is not declared: declare it in [classes], or set those pixels to 0"],
            path=ws.rejected / "bikes",
            now=NOON,
        )
    text = rendered(snapshot_of(ws), ws)
    assert "[bold]bikes" in text
    assert "declare it in [classes], or set those pixels to 0" in text


def test_a_queued_step_says_it_waits_for_the_daemon_and_keeps_its_last_attempt_apart(ws: Workspace) -> None:
    add_steps(ws, "promoted", "requeued")
    data = snapshot_of(ws)
    reason = f"waits for the daemon, which is not running: start it with `ciss daemon -w {ws.root}`"
    assert data["waiting"] == reason
    assert data["steps"][1]["reason"] == reason
    assert data["steps"][1]["last_attempt"] == "the training process was killed by SIGKILL"
    assert f"queue: step 1 (b1); {reason}" in rendered(data, ws)


def test_a_held_step_blocks_the_queue_and_says_how_to_free_it(ws: Workspace) -> None:
    add_steps(ws, "promoted", "held", "queued")
    data = snapshot_of(ws)
    assert (
        data["waiting"] == "waits for held step 1: `ciss promote 1` or `ciss discard 1` lets the queue go on"
    )


def test_a_closed_training_window_names_its_next_opening(ws: Workspace) -> None:
    add_steps(ws, "queued")
    settings = parse_settings('[daemon]\ntraining_window = "* 22-23 * * *"\n')
    lock = InstanceLock(ws.lock_path)
    lock.acquire()  # a daemon runs
    try:
        data = snapshot_of(ws, settings=settings, now=NOON)
        opens = dt.datetime(2026, 5, 1, 22, 0, tzinfo=dt.UTC).astimezone().strftime("%Y-%m-%d %H:%M")
        assert (
            data["waiting"]
            == f"waits for the training window '* 22-23 * * *' (UTC), which opens next at {opens}"
        )
        night = dt.datetime(2026, 5, 1, 22, 30, tzinfo=dt.UTC)
        data = snapshot_of(ws, settings=settings, now=night)
        assert data["waiting"] == "starts at the daemon's next check"
    finally:
        lock.release()


def test_a_starting_job_is_one_short_line(ws: Workspace) -> None:
    data = snapshot_of(ws)
    data["running"] = {"step": 2, "batch": "b2", "attempts": 1, "max_attempts": 3, "progress": {}}
    assert "training step 2 (b2), attempt 1/3: starting\n" in rendered(data, ws)


def test_a_job_on_ray_names_the_cluster_and_its_nodes(ws: Workspace) -> None:
    data = snapshot_of(ws)
    cluster = {
        "launcher": "ray",
        "address": "10.0.0.1:6379",
        "nodes": ["gpu1 (10.0.0.11)", "gpu2 (10.0.0.12)"],
    }
    progress = {"phase": "training", "iteration": 3, "total": 12, "ranks": 8, "cluster": cluster}
    data["running"] = {"step": 2, "batch": "b2", "attempts": 1, "max_attempts": 3, "progress": progress}
    assert (
        ", on 8 processes, on the Ray cluster at 10.0.0.1:6379 (nodes gpu1 (10.0.0.11), gpu2 (10.0.0.12))\n"
        in rendered(data, ws)
    )


def test_status_survives_a_typo_in_ciss_toml(ws: Workspace) -> None:
    add_steps(ws, "promoted")
    ws.settings_path.write_text("[daemon\nsettle_seconds = 1\n", encoding="utf-8")
    result = runner.invoke(app, ["status", "--json", "-w", str(ws.root)])
    assert result.exit_code == 0
    first, *rest = result.output.splitlines()
    assert first == (
        "Warning: ciss.toml: not valid TOML: Expected ']' at the end of a table declaration (at line 1, "
        "column 8); `ciss daemon` will not start until the file is fixed"
    )
    assert '"version": "v0001"' in "\n".join(rest)
    lock = InstanceLock(ws.lock_path)
    lock.acquire()
    try:
        result = runner.invoke(app, ["classes", "-w", str(ws.root)])
    finally:
        lock.release()
    assert result.exit_code == 0
    assert result.output.splitlines()[0].endswith(
        "; the running daemon keeps the settings it started with until the file is fixed"
    )
    assert "class-0" in result.output


def test_models_lists_every_version_the_current_one_and_what_can_be_rolled_back_to(ws: Workspace) -> None:
    add_steps(ws, "promoted", "promoted", "promoted", "held")
    for version in ("v0001", "v0002", "v0003", "v0004"):
        (ws.models / version).mkdir()
    rows = model_rows(factory_of(ws))
    assert [(r["version"], r["step"], r["state"], r["current"], r["rollback"]) for r in rows] == [
        ("v0001", 0, "retired", False, True),
        ("v0002", 1, "retired", False, True),
        ("v0003", 2, "promoted", True, False),
        ("v0004", 3, "candidate", False, False),
    ]
    result = runner.invoke(app, ["models", "--json", "-w", str(ws.root)])
    assert result.exit_code == 0 and json.loads(result.output) == rows
    console = Console(record=True, width=200)
    console.print(views.model_table(rows))
    text = console.export_text()
    assert "│ v0003   │ 2    │ promoted, current      │" in text
    assert "│ v0001   │ 0    │ retired, can roll back │" in text


def test_rollback_to_an_unknown_version_points_to_ciss_models(ws: Workspace) -> None:
    add_steps(ws, "promoted")
    result = runner.invoke(app, ["rollback", "v0009", "-w", str(ws.root)])
    assert result.output == "Error: no model version 'v0009' in the catalog; `ciss models` lists them\n"


def test_summary_lines_name_both_groupings() -> None:
    metrics = {
        "miou_all": 0.5,
        "miou_old": 0.6,
        "miou_new": 0.3,
        "hiou": 0.4,
        "paper": {"miou_old": 0.7, "miou_new": 0.35, "hiou": 0.4667},
    }
    text = views.summary_lines(metrics)
    assert text.splitlines()[0] == (
        "mIoU all 50.0   gate grouping (old = classes before the step): old 60.0  new 30.0  hIoU 40.0"
    )
    assert (
        text.splitlines()[1].strip() == "paper grouping (old = base classes): old 70.0  new 35.0  hIoU 46.7"
    )
    # Metrics recorded before the paper grouping existed show the gate's line only.
    assert len(views.summary_lines({k: v for k, v in metrics.items() if k != "paper"}).splitlines()) == 1


def test_the_current_model_panel_lists_at_most_40_class_names(ws: Workspace) -> None:
    data = {
        "daemon": {"alive": False, "pid": None},
        "workspace": str(ws.root),
        "current": {
            "version": "v0100",
            "step": 99,
            "classes": [{"id": i, "name": f"c{i}"} for i in range(1, 101)],
            "metrics": {},
        },
        "steps": [],
        "queue": [],
        "rejections": [],
        "events": [],
    }
    text = rendered(data, ws)
    assert "100 classes: c1, c2," in text and "c40, and 60 more (`ciss" in text
    assert "c41" not in text
