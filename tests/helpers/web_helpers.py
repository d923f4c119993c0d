"""A catalog in a known state for the dashboard, metrics and notification tests, written through the
catalog's own functions (as the daemon writes it). Names carry HTML on purpose: the page must show them
as text. Import as `from web_helpers import seed` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from daemon_helpers import new_workspace, settings_text
from sqlalchemy import select
from sqlalchemy.orm import Session

from benchmarks.dashboard import evaluated_version  # the dashboard benchmark writes its history alike
from ciss_daemon.catalog import connection
from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.tables import Batch, Step
from ciss_daemon.service.promotion import swap_current
from ciss_daemon.workspace import Workspace

TOKEN = "test-token-0123456789abcdef"
EVIL_BATCH = "<script>window.pwned=1</script>"
EVIL_CLASS = "<b>dog</b><script>window.pwned=2</script>"
EVIL_REJECTED = "<img src=x onerror=window.pwned=3>"
HELD_REASON = "new-class mIoU 0.050 is below the floor 0.100"
T0 = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)


def metrics(old: float, new: float | None, iou: dict[str, float]) -> dict[str, float | None | dict]:
    hiou = None if new is None else 2 * old * new / (old + new)
    values = [*iou.values()]
    return {"iou": iou, "miou_old": old, "miou_new": new, "miou_all": sum(values) / len(values), "hiou": hiou}


def workspace(root: Path, *, token: str = "", **overrides: object) -> Workspace:
    """A workspace with tiny settings, ``[web] token`` set when given."""
    if token:
        overrides["web__token"] = token
    return new_workspace(root, settings_text(**overrides))


def seed(ws: Workspace, *, running: bool = False) -> None:
    """Step 0 promoted (v0001), step 1 held (v0002, HTML in its names), a rejection with HTML in it; with
    ``running``, step 1 is discarded and step 2 trains, its progress in the job folder's progress.json."""
    url = f"sqlite:///{ws.catalog_path}"
    factory = connection.session_factory(connection.make_engine(url))
    with connection.transaction(factory) as s:
        for index, (name, classes) in enumerate([("b000", {1: "cat"}), (EVIL_BATCH, {1: EVIL_CLASS})]):
            _seed_step(s, ws, index, name, classes)
        catalog.record_rejection(
            session=s,
            batch_name=EVIL_REJECTED,
            reasons=["masks/0001.png: value 7 is not declared in batch.toml", "images/0002.jpg: <script>x"],
            path=ws.rejected / "evil",
            now=T0,
        )
        if running:
            held = s.scalar(select(Step).where(Step.index == 1))
            catalog.discard_step(session=s, step=held, reason="discarded by the operator", now=T0)
            step = catalog.create_step(session=s, batch=record_bird_batch(s, ws, now=T0), now=T0)
            job = catalog.create_job(session=s, step=step, max_attempts=3, jobs_dir=ws.jobs, now=T0)
            catalog.start_job(session=s, job=job, pid=1, now=T0)
            catalog.update_job_progress(session=s, job=job, progress={"phase": "training", "iteration": 1})
    if running:
        write_progress(ws, job.id, iteration=7)


def _seed_step(s: Session, ws: Workspace, index: int, name: str, classes: dict[int, str]) -> None:
    """Step 0 trained and promoted as v0001, or step 1 trained and held as v0002 (``index``)."""
    at = T0 + dt.timedelta(hours=index)
    batch = catalog.record_batch(
        session=s,
        name=name,
        kind="train",
        sha256=f"{index:064d}",
        store_path=ws.store / f"b{index}",
        class_names=classes,
        n_train=8,
        n_val=2,
        now=at,
    )
    step = catalog.create_step(session=s, batch=batch, now=at)
    job = catalog.create_job(session=s, step=step, max_attempts=3, jobs_dir=ws.jobs, now=at)
    catalog.start_job(session=s, job=job, pid=1, now=at)
    if index == 0:
        candidate, current = metrics(0.85, None, {"0": 0.9, "1": 0.8}), None
    else:
        candidate = metrics(0.84, 0.05, {"0": 0.9, "1": 0.78, "2": 0.05})
        current = metrics(0.85, None, {"0": 0.9, "1": 0.8})
    history = [{"mbce": 0.9, "ac": 0.3, "total": 1.2}, {"mbce": 0.5, "ac": 0.2, "total": 0.7}]
    version = evaluated_version(
        s, ws, job, {"candidate": candidate, "current": current, "history": history}, at=at
    )
    (ws.models / version.version).mkdir()
    if index == 0:
        swap_current(ws.models, version.version)
        catalog.promote_version(session=s, version=version, reason="base mIoU 0.850", now=at)
        catalog.log_event(session=s, kind="promoted", message="step 0: v0001 promoted", step=step, now=at)
    else:
        catalog.set_step_state(session=s, step=step, state="held", reason=HELD_REASON, now=at)
        catalog.log_event(
            session=s, kind="held", level="warning", message=f"step 1 held: {HELD_REASON}", now=at
        )


def record_bird_batch(s: Session, ws: Workspace, *, now: dt.datetime | None = None) -> Batch:
    """Batch ``b002`` teaching ``bird``: the one after the seeded steps."""
    return catalog.record_batch(
        session=s,
        name="b002",
        kind="train",
        sha256="2" * 64,
        store_path=ws.store / "b2",
        class_names={1: "bird"},
        n_train=8,
        n_val=2,
        now=now,
    )


def write_progress(ws: Workspace, job_id: int, *, iteration: int) -> None:
    """What the worker writes into its job folder (see ``worker.ProgressWriter``)."""
    folder = ws.jobs / str(job_id)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "progress.json").write_text(
        json.dumps(
            {
                "phase": "training",
                "iteration": iteration,
                "total": 20,
                "epoch": 1,
                "epochs": 4,
                "losses": {"mbce": 0.4, "kd": 0.1, "total": 0.5},
                "images_per_second": 12.5,
                "eta_seconds": 42.0,
            }
        )
    )


class Hook:
    """A local webhook: records each JSON body; ``status`` is its answer; ``gate`` holds answers back."""

    def __init__(self, status: int = 200) -> None:
        self.bodies: list[dict] = []
        self.status = status
        self.gate = threading.Event()
        self.gate.set()
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.bodies.append({"json": json.loads(body), "type": self.headers["Content-Type"]})
                hook.gate.wait(30)
                self.send_response(hook.status)
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}/services/T000/B000/secret"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()
        self.server.server_close()
