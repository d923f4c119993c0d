"""/metrics in Prometheus' text format, parsed back with prometheus-client's own parser."""

from __future__ import annotations

import warnings
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from web_helpers import T0, seed, workspace

from ciss_daemon.service.systemd import InstanceLock
from ciss_daemon.settings import load_settings
from ciss_daemon.web.app import create_app
from ciss_daemon.workspace import Workspace


def scrape(ws: Workspace) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    answer = TestClient(create_app(ws, load_settings(ws.settings_path))).get("/metrics")
    assert answer.status_code == 200 and answer.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(answer.text)
        for sample in family.samples
    }


def test_steps_by_state_last_promotion_rejections_and_held_since(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    seed(ws)
    m = scrape(ws)
    assert m[("ciss_steps", (("state", "promoted"),))] == 1
    assert m[("ciss_steps", (("state", "held"),))] == 1
    assert m[("ciss_steps", (("state", "failed"),))] == 0
    assert m[("ciss_rejections_total", ())] == 1
    assert m[("ciss_current_model_info", (("step", "0"), ("version", "v0001")))] == 1
    assert m[("ciss_current_model_version", ())] == 1
    assert m[("ciss_last_promotion_timestamp_seconds", ())] == T0.timestamp()
    assert m[("ciss_held_step_since_timestamp_seconds", ())] == T0.timestamp() + 3600
    assert m[("ciss_current_model_miou", (("classes", "old"),))] == 0.85
    assert m[("ciss_daemon_up", ())] == 0
    assert m[("ciss_job_running", ())] == 0
    assert ("ciss_job_iteration", ()) not in m


def test_the_running_jobs_progress_and_whether_the_daemon_is_up(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    seed(ws, running=True)
    lock = InstanceLock(ws.lock_path)  # what a running daemon holds
    lock.acquire()
    try:
        m = scrape(ws)
    finally:
        lock.release()
    assert m[("ciss_daemon_up", ())] == 1
    assert m[("ciss_job_running", ())] == 1
    assert m[("ciss_job_step", ())] == 2
    assert m[("ciss_job_iteration", ())] == 7 and m[("ciss_job_iterations_total", ())] == 20
    assert m[("ciss_job_progress_ratio", ())] == 0.35
    assert m[("ciss_job_images_per_second", ())] == 12.5
    assert m[("ciss_job_eta_seconds", ())] == 42
    assert m[("ciss_steps", (("state", "training"),))] == 1
    assert ("ciss_held_step_since_timestamp_seconds", ()) not in m
