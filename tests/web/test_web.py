"""The dashboard's app through Starlette's test client: what the page shows, who may act, what is served."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

with warnings.catch_warnings():  # starlette asks for httpx2; httpx is what the extra installs today
    warnings.simplefilter("ignore")
    from starlette.testclient import TestClient

from typer.testing import CliRunner
from web_helpers import (
    EVIL_BATCH,
    EVIL_CLASS,
    EVIL_REJECTED,
    HELD_REASON,
    TOKEN,
    record_bird_batch,
    seed,
    workspace,
)

from ciss_daemon import web
from ciss_daemon.cli import app as cli_app
from ciss_daemon.settings import load_settings
from ciss_daemon.web import samples
from ciss_daemon.web.app import create_app, safe_file
from ciss_daemon.workspace import Workspace

REPO = Path(__file__).resolve().parents[2]


def client(ws: Workspace) -> TestClient:
    return TestClient(create_app(ws, load_settings(ws.settings_path)), base_url="http://127.0.0.1:8470")


@pytest.fixture
def seeded(tmp_path: Path) -> Workspace:
    ws = workspace(tmp_path / "ws")
    seed(ws)
    return ws


def test_the_page_shows_model_lineage_metrics_held_numbers_and_full_rejection_reasons(
    seeded: Workspace,
) -> None:
    page = client(seeded).get("/")
    assert page.status_code == 200
    text = page.text
    assert '<strong id="current-version">v0001</strong> from step 0' in text
    assert "teacher none (base step)" in text
    # gate's and paper's groupings: mIoU old 85.0 in both at step 0, all = mean(0.9, 0.8)
    assert "<td>gate's (old: before step 0)</td><td>85.0</td><td>85.0</td><td>-</td>" in text
    assert "<td>paper's (old: base step)</td><td>85.0</td><td>85.0</td><td>-</td>" in text
    # the held step: its reason and the numbers the gate compared, with the rule
    assert HELD_REASON in text
    assert "<td>new-class mIoU</td><td>5.0</td><td>-</td><td>must reach 0.0</td>" in text
    assert "<td>old-class mIoU</td><td>84.0</td><td>85.0</td><td>may fall at most 100.0</td>" in text
    # every reason of a rejection, not only the first
    assert "value 7 is not declared in batch.toml" in text and "images/0002.jpg: &lt;script&gt;x" in text
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-content-type-options"] == "nosniff"


def test_every_name_is_escaped(seeded: Workspace) -> None:
    text = client(seeded).get("/").text
    for name in (EVIL_BATCH, EVIL_CLASS, EVIL_REJECTED):
        assert name not in text
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in text
    assert "&lt;b&gt;dog&lt;/b&gt;&lt;script&gt;window.pwned=2&lt;/script&gt;" in text
    assert "&lt;img src=x onerror=window.pwned=3&gt;" in text
    # chart data sits in a JSON script block: no "<" may close it early
    block = text.split('<script type="application/json" id="chart-data">', 1)[1].split("</script>", 1)[0]
    assert "<" not in block and json.loads(block)["steps"] == ["step 0", "step 1"]


def test_the_charts_data_holds_miou_per_step_iou_per_class_and_losses(seeded: Workspace) -> None:
    charts = client(seeded).get("/api/status").json()["charts"]
    assert charts["miou"]["miou_old"] == [0.85, 0.84]
    assert charts["heatmap"]["classes"] == ["background", "cat", EVIL_CLASS]
    assert charts["heatmap"]["values"] == [[0.9, 0.9], [0.8, 0.78], [None, 0.05]]
    assert charts["loss"]["labels"] == ["s0 e1", "s0 e2", "s1 e1", "s1 e2"]
    assert charts["loss"]["terms"]["total"] == [1.2, 0.7, 1.2, 0.7]


def test_live_reads_the_running_jobs_progress_from_its_job_folder(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    seed(ws, running=True)
    live = client(ws).get("/api/live").json()
    assert live["daemon"] is False
    running = live["running"]
    assert (running["step"], running["batch"], running["iteration"], running["total"]) == (2, "b002", 7, 20)
    assert running["losses"] == {"mbce": 0.4, "kd": 0.1, "total": 0.5}
    assert (running["images_per_second"], running["eta"], running["epoch"]) == (12.5, "0m42s", 2)
    assert '<span id="running-iteration">7</span>' in client(ws).get("/").text


def test_without_a_token_the_dashboard_is_read_only(seeded: Workspace) -> None:
    c = client(seeded)
    assert 'id="token"' not in c.get("/").text and 'data-action="promote"' not in c.get("/").text
    answer = c.post("/api/actions/promote", json={"target": "1"}, headers={"Authorization": "Bearer x"})
    assert answer.status_code == 403
    assert answer.json()["message"] == (
        "read-only dashboard: set [web] token in ciss.toml to allow operator actions"
    )
    assert _state(c, 1) == "held"


def test_an_action_needs_the_token_in_its_header_and_then_goes_through_run_action(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws", token=TOKEN)
    seed(ws)
    c = client(ws)
    assert 'data-action="promote" data-target="1"' in c.get("/").text
    refusals = [
        ({}, {"target": "1"}, 401),  # no token
        ({"Authorization": "Bearer wrong-token-0123456789"}, {"target": "1"}, 401),
        ({"Authorization": TOKEN}, {"target": "1"}, 401),  # not a bearer header
        ({"Authorization": f"Bearer {TOKEN}", "Origin": "http://evil.example"}, {"target": "1"}, 403),
    ]
    for headers, body, code in refusals:
        answer = c.post("/api/actions/promote", json=body, headers=headers)
        assert answer.status_code == code, headers
    assert c.post("/api/actions/promote", json={"target": "1"}).json()["message"] == (
        "wrong or missing operator token; enter the [web] token of ciss.toml"
    )
    # a form post (what a cross-site page could send without a preflight) is refused even with the token
    form = c.post("/api/actions/promote", data={"target": "1"}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert form.status_code == 415
    assert _state(c, 1) == "held"
    bearer = {"Authorization": f"Bearer {TOKEN}", "Origin": "http://127.0.0.1:8470"}
    wrong = c.post("/api/actions/promote", json={"target": "0"}, headers=bearer)
    assert wrong.status_code == 409
    assert wrong.json()["message"] == "step 0 is promoted and has no candidate model waiting"
    done = c.post("/api/actions/promote", json={"target": "1"}, headers=bearer)
    assert done.json() == {"ok": True, "message": "v0002 (step 1) is now the current model"}
    assert _state(c, 1) == "promoted"
    assert os.readlink(ws.current) == "v0002"
    rolled = c.post("/api/actions/rollback", json={"target": "v0001"}, headers=bearer)
    assert rolled.status_code == 200 and _state(c, 1) == "rolled_back"
    assert c.post("/api/actions/delete", json={}, headers=bearer).status_code == 404


def _state(c: TestClient, index: int) -> str:
    return next(s["state"] for s in c.get("/api/status").json()["steps"] if s["index"] == index)


def test_no_url_serves_a_file_outside_the_sample_folder(seeded: Workspace, tmp_path: Path) -> None:
    folder = samples.folder(seeded) / "v0001"
    folder.mkdir(parents=True)
    (folder / "0.image.png").write_bytes(b"\x89PNG fake")
    secret = tmp_path / "secret.png"
    secret.write_bytes(b"secret")
    (folder / "link.png").symlink_to(secret)
    (samples.folder(seeded) / "linkdir").symlink_to(tmp_path)
    (seeded.root / "inside.png").write_bytes(b"workspace file")
    c = client(seeded)
    assert c.get("/samples/v0001/0.image.png").content == b"\x89PNG fake"
    for url in (
        "/samples/../ciss.toml",
        "/samples/%2e%2e/ciss.toml",
        "/samples/..%2Fciss.toml",
        "/samples/v0001%2F..%2F..%2Finside.png",
        "/samples/v0001/..%2F..%2Finside.png",
        "/samples/%2Fetc%2Fpasswd",
        "/samples//etc/passwd",
        "/samples/v0001%5C..%5C..%5Cinside.png",
        "/samples/v0001/link.png",
        "/samples/linkdir/secret.png",
        "/static/..%2F..%2Fcatalog.py",
        "/static/%2e%2e/app.py",
    ):
        answer = c.get(url)
        assert answer.status_code == 404, url
        assert b"secret" not in answer.content and b"workspace file" not in answer.content, url
    assert safe_file(samples.folder(seeded), "v0001/../../ciss.toml") is None
    assert c.get("/static/dashboard.js").status_code == 200


def test_metrics_and_page_answer_503_with_the_reason_when_there_is_no_catalog(tmp_path: Path) -> None:
    ws = workspace(tmp_path / "ws")
    ws.catalog_path.unlink()
    c = client(ws)
    page = c.get("/")
    assert page.status_code == 503 and f"no catalog at {ws.catalog_path}" in page.text
    assert c.get("/metrics").status_code == 503


def test_the_dashboard_never_imports_torch(seeded: Workspace) -> None:
    code = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "from starlette.testclient import TestClient\n"
        "from ciss_daemon.settings import load_settings\n"
        "from ciss_daemon.web.app import create_app\n"
        "from pathlib import Path\n"
        "from ciss_daemon.workspace import Workspace\n"
        f"ws = Workspace(Path({str(seeded.root)!r}))\n"
        "c = TestClient(create_app(ws, load_settings(ws.settings_path)))\n"
        "assert all(c.get(u).status_code == 200 for u in ('/', '/api/live', '/api/status', '/metrics'))\n"
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120, check=True
    )
    assert result.stdout.strip() == "[]"


def test_ciss_web_without_the_extra_says_what_to_install(
    seeded: Workspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = web.importlib.util.find_spec
    monkeypatch.setattr(
        web.importlib.util, "find_spec", lambda name: None if name == "starlette" else real(name)
    )
    result = CliRunner().invoke(cli_app, ["web", "--workspace", str(seeded.root)])
    assert result.exit_code == 1
    assert result.output.strip() == (
        "Error: the dashboard needs starlette, which is not installed; run: pip install 'ciss[web]'"
    )


def test_web_settings_are_checked(tmp_path: Path) -> None:
    from ciss_daemon.exceptions import SettingsError
    from ciss_daemon.settings import parse_settings

    with pytest.raises(SettingsError) as short:
        parse_settings('[web]\ntoken = "abc"')
    assert str(short.value).startswith("ciss.toml: web.token: 3 characters is too short to guess safely")
    with pytest.raises(SettingsError) as port:
        parse_settings("[web]\nport = 0")
    assert str(port.value) == "ciss.toml: web.port: 0 must be between 1 and 65535"
    assert parse_settings("").web.host == "127.0.0.1"


def test_the_step_table_shows_the_latest_steps_and_any_older_held_one() -> None:
    from ciss_daemon.web.data import TABLE_STEPS, shown_steps

    steps = [{"index": i, "state": "held" if i == 3 else "promoted"} for i in range(TABLE_STEPS + 20)]
    shown = [st["index"] for st in shown_steps(steps, all_steps=False)]
    assert shown == [*range(TABLE_STEPS + 19, 19, -1), 3]
    assert len(shown_steps(steps, all_steps=True)) == TABLE_STEPS + 20


def test_the_charts_follow_a_new_step_although_their_data_is_cached(seeded: Workspace) -> None:
    from ciss_daemon.catalog import connection
    from ciss_daemon.catalog import records as catalog

    c = client(seeded)
    assert c.get("/api/status").json()["charts"]["steps"] == ["step 0", "step 1"]
    assert c.get("/api/status").json()["charts"]["steps"] == ["step 0", "step 1"]  # from the cache
    factory = connection.session_factory(connection.make_engine(f"sqlite:///{seeded.catalog_path}"))
    with connection.transaction(factory) as s:
        step = catalog.create_step(session=s, batch=record_bird_batch(s, seeded))
        catalog.log_event(session=s, kind="accepted", message="batch 'b002' accepted as step 2", step=step)
    assert c.get("/api/status").json()["charts"]["steps"] == ["step 0", "step 1", "step 2"]


def test_ciss_web_on_a_port_in_use_says_so_in_one_line(seeded: Workspace) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["web", "--workspace", str(seeded.root), "--port", str(port)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot serve the dashboard on 127.0.0.1:{port} (the address is in use or not available); "
        "choose another [web] port or stop what uses it"
    )


def test_reading_the_dashboard_never_changes_the_catalog(tmp_path: Path) -> None:
    import sqlite3

    ws = workspace(tmp_path / "ws", token=TOKEN)
    seed(ws, running=True)

    def dump() -> list[str]:
        db = sqlite3.connect(ws.catalog_path)
        try:
            return list(db.iterdump())
        finally:
            db.close()

    before = dump()
    c = client(ws)
    for url in ("/", "/?steps=all", "/api/status", "/api/live", "/metrics", "/samples/x.png"):
        c.get(url)
    c.post("/api/actions/promote", json={"target": "1"})  # no token: refused
    assert dump() == before


def test_the_paper_grouping_recorded_by_the_engine_is_shown_as_it_is(seeded: Workspace) -> None:
    import sqlite3

    db = sqlite3.connect(seeded.catalog_path)
    with db:
        db.execute(
            "UPDATE model_versions SET metrics = json_set(metrics, '$.candidate.paper', "
            'json(\'{"miou_old": 0.5, "miou_new": 0.25, "hiou": 0.3333}\')) WHERE version = \'v0001\''
        )
    db.close()
    text = client(seeded).get("/").text
    assert "<td>paper's (old: base step)</td><td>85.0</td><td>50.0</td><td>25.0</td><td>33.3</td>" in text
