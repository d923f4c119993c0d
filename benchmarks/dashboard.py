"""Benchmark of the dashboard (`ciss web`) on a long history, and the README's screenshot.

    python benchmarks/dashboard.py page-load --out bench-out/web     # 1,000 steps; or: make bench-web
    python benchmarks/dashboard.py screenshot --out docs/images/dashboard.png

``page-load`` fills a catalog with ``--steps`` promoted steps (``benchmarks.catalog_builder.build_catalog``:
full metrics and loss history per step, as a long-lived daemon leaves them), starts ``ciss web`` on it as its
own process, and times, after one warm-up each:

- ``GET /``: a fresh connection, until the whole page has arrived (server side: catalog reads and HTML):
  the first one after start (which reads the metrics of every charted model version, kept from then on:
  they never change), then each right after a catalog change (an event written, as the daemon writes one
  at each outcome: the chart data is built again), then with the catalog unchanged (chart data cached);
- ``GET /api/live`` (what the page polls every second) and ``GET /metrics``;
- a page load in headless Chromium (when /usr/bin/chromium exists), each after a catalog change, by the
  browser's own clock from navigation start: the page received, DOMContentLoaded, the charts drawn (the
  page's script notes ``performance.now()`` when it has drawn them) and the ``load`` event. Static files
  come from the browser's cache after the warm-up, as on any visit after the first.

It writes ``results.json`` (every sample) and ``results.md`` into ``--out`` and prints the table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from sqlalchemy.orm import Session  # noqa: E402

from benchmarks.catalog_builder import build_catalog  # noqa: E402
from benchmarks.measure import cli, loadavg, machine_info, new_workspace, summary  # noqa: E402
from ciss_daemon.catalog import connection  # noqa: E402 - after the path is set, for a plain `python benchmarks/...`
from ciss_daemon.catalog import records as catalog  # noqa: E402
from ciss_daemon.catalog.tables import Batch, Job, ModelVersion  # noqa: E402
from ciss_daemon.workspace import Workspace  # noqa: E402

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
CHARTS_DRAWN = "() => document.body.dataset.charts === '4'"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(ws: Workspace) -> Iterator[str]:
    """`ciss web` on ``ws`` as its own process; yields its URL."""
    port = _free_port()
    log = open(ws.root / "web.log", "ab")  # noqa: SIM115 - closed below
    process = subprocess.Popen(
        cli("web", "--workspace", str(ws.root), "--port", str(port)), stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/api/live", timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError(f"ciss web did not start; see {ws.root / 'web.log'}") from None
                time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(30)
        log.close()


def time_get(url: str, runs: int, before: Callable[[], None] = lambda: None) -> tuple[dict[str, Any], int]:
    """Seconds of ``GET url`` until the last byte, each on a new connection, ``before`` run ahead of each;
    and the page's size."""
    samples, size = [], 0
    for attempt in range(runs + 1):
        before()
        start = time.perf_counter()
        with urllib.request.urlopen(url, timeout=60) as answer:
            size = len(answer.read())
        if attempt:  # the first is a warm-up
            samples.append(time.perf_counter() - start)
    return summary(samples), size


def time_browser(url: str, runs: int, before: Callable[[], None]) -> dict[str, Any] | None:
    """Seconds from navigation start until the load event and until the charts are drawn, in Chromium."""
    if not CHROMIUM.exists():
        return None
    from playwright.sync_api import sync_playwright

    marks: dict[str, list[float]] = {
        "response_end": [],
        "dom_ready": [],
        "load_event": [],
        "charts_drawn": [],
    }
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        for attempt in range(runs + 1):
            page.goto("about:blank")
            before()
            page.goto(url, wait_until="load")
            page.wait_for_function(CHARTS_DRAWN)
            # Milliseconds from navigation start, by the browser's clock; the page notes when its charts
            # were drawn (dashboard.js).
            at = page.evaluate(
                """() => {
                    const n = performance.getEntriesByType('navigation')[0];
                    return [n.responseEnd, n.domContentLoadedEventEnd, n.loadEventEnd,
                            Number(document.body.dataset.chartsDrawnAt)];
                }"""
            )
            if attempt:
                for key, value in zip(marks, at, strict=True):
                    marks[key].append(value / 1000)
        browser.close()
    return {key: summary(values) for key, values in marks.items()}


def cpu_reference() -> float:
    """Seconds of a fixed piece of pure-Python work (``sum(range(10**7))``), median of 3: how much CPU this
    process got while the figures were taken; compare it with the same work on an idle machine."""
    samples = []
    for _ in range(3):
        start = time.perf_counter()
        sum(range(10**7))
        samples.append(time.perf_counter() - start)
    return round(sorted(samples)[1], 3)


def page_load(out: Path, *, steps: int, runs: int, workdir: Path | None) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="ciss-web-bench-", dir=workdir))
    ws = new_workspace(root / "ws", "")  # every setting at its default
    stats = build_catalog(ws, steps=steps)
    results: dict[str, Any] = {
        "taken_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(root),
        "catalog": {"steps": stats.steps, "classes": stats.classes, "bytes": stats.bytes},
        "runs": runs,
        "cpu_reference_at_start": cpu_reference(),
    }
    factory = connection.session_factory(connection.make_engine(f"sqlite:///{ws.catalog_path}"))

    def change() -> None:
        """What the daemon does at each step outcome: a new event, so the page reads everything again."""
        with connection.transaction(factory) as s:
            catalog.log_event(session=s, kind="bench", message="the benchmark changed the catalog")

    with serving(ws) as url:
        start = time.perf_counter()
        with urllib.request.urlopen(f"{url}/", timeout=120) as answer:
            answer.read()
        results["first_page_seconds"] = round(time.perf_counter() - start, 4)
        results["get_page"], results["page_bytes"] = time_get(f"{url}/", runs, change)
        results["get_page_unchanged"], _ = time_get(f"{url}/", runs)
        results["get_live"], _ = time_get(f"{url}/api/live", runs)
        results["get_metrics"], _ = time_get(f"{url}/metrics", runs)
        results["browser"] = time_browser(f"{url}/", runs, change)
    results["loadavg_at_end"] = loadavg()
    results["cpu_reference_at_end"] = cpu_reference()
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    return results


def markdown(r: dict[str, Any]) -> str:
    rows = [
        ("`GET /` after a catalog change (whole page, server side)", r["get_page"]),
        ("`GET /`, catalog unchanged (chart data cached)", r["get_page_unchanged"]),
        ("`GET /api/live` (what the page polls every second)", r["get_live"]),
        ("`GET /metrics`", r["get_metrics"]),
    ]
    if r["browser"]:
        rows += [
            ("Chromium: navigation start to the page received", r["browser"]["response_end"]),
            ("Chromium: ... to DOMContentLoaded (scripts run)", r["browser"]["dom_ready"]),
            ("Chromium: ... to charts drawn", r["browser"]["charts_drawn"]),
            ("Chromium: ... to the `load` event", r["browser"]["load_event"]),
        ]
    first = r["first_page_seconds"]
    lines = [
        f"{r['catalog']['steps']:,} steps, {r['catalog']['classes']:,} classes, "
        f"{r['catalog']['bytes'] / 2**20:.1f} MiB catalog; page {r['page_bytes'] / 1024:.0f} KiB; "
        f"{r['runs']} runs after a warm-up; load average {r['machine']['loadavg_at_start']} at start, "
        f"{r['loadavg_at_end']} at end; CPU reference `sum(range(10**7))` {r['cpu_reference_at_start']} s at "
        f"start, {r['cpu_reference_at_end']} s at end.",
        "",
        "| what | median s | min s | max s |",
        "|---|---|---|---|",
        f"| first `GET /` after `ciss web` starts (reads every chart's metrics) | {first:.3f} | | |",
    ]
    lines += [f"| {label} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} |" for label, s in rows]
    return "\n".join(lines) + "\n"


CLASSES = [
    ("person", "car"),
    ("bicycle", "bus"),
    ("dog", "cat"),
    ("bench", "truck"),
    ("bird", "train"),
    ("horse", "boat"),
    ("sheep", "cow"),
]


def screenshot(out: Path) -> None:
    """The dashboard of a made-up but plausible history (7 steps, the 8th training), for the README."""
    from playwright.sync_api import sync_playwright

    root = Path(tempfile.mkdtemp(prefix="ciss-web-shot-"))
    ws = new_workspace(root / "ws", "")  # every setting at its default
    _fill_history(ws)
    with serving(ws) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_function(CHARTS_DRAWN)
        out.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(out), full_page=True, clip={"x": 0, "y": 0, "width": 1280, "height": 1900})
        browser.close()
    print(f"screenshot written to {out}")


def _fill_history(ws: Workspace) -> None:
    """Steps written through the catalog's functions, with IoUs that fade a little at each later step (the
    forgetting the heat map shows) and losses that fall over each step's epochs; the last step trains."""
    rng = random.Random(7)
    factory = connection.session_factory(connection.make_engine(f"sqlite:///{ws.catalog_path}"))
    start = dt.datetime.now(dt.UTC) - dt.timedelta(days=len(CLASSES))
    learned: dict[int, float] = {0: 0.92}  # class id -> IoU when learned
    with connection.transaction(factory) as s:
        for index, names in enumerate([*CLASSES, ("scooter", "tram")]):
            at = start + dt.timedelta(days=index)
            batch, job = _started_step(s, ws, index, names, at)
            if index == len(CLASSES):
                job_dir = Path(job.workdir)
                break
            # The draws keep their order (new IoUs, fades, then losses): the same seed, the same picture.
            candidate = _faded_metrics(rng, learned, index, [c.id for c in batch.classes])
            history = _loss_history(rng, index)
            metrics = {"candidate": candidate, "current": None, "history": history}
            version = evaluated_version(s, ws, job, metrics, at=at)
            catalog.promote_version(session=s, version=version, reason="passed the gate", now=at)
    _write_training_progress(job_dir)


def _started_step(
    s: Session, ws: Workspace, index: int, names: tuple[str, str], at: dt.datetime
) -> tuple[Batch, Job]:
    """Step ``index`` teaching ``names``, its job started by this process."""
    batch = catalog.record_batch(
        session=s,
        name=f"{names[0]}s-2026-{index + 5:02d}",
        kind="train",
        sha256=f"{index:064x}",
        store_path=ws.store / str(index),
        class_names=dict(enumerate(names, start=1)),
        n_train=400,
        n_val=40,
        now=at,
    )
    step = catalog.create_step(session=s, batch=batch, now=at)
    job = catalog.create_job(session=s, step=step, max_attempts=3, jobs_dir=ws.jobs, now=at)
    catalog.start_job(session=s, job=job, pid=os.getpid(), now=at)
    return batch, job


def evaluated_version(
    s: Session, ws: Workspace, job: Job, metrics: dict[str, Any], *, at: dt.datetime
) -> ModelVersion:
    """What a training job that went well leaves: the job done, its step evaluating, and the candidate's
    model version (no files) with ``metrics`` (candidate, current and loss history)."""
    catalog.finish_job(session=s, job=job, state="done", now=at)
    catalog.set_step_state(session=s, step=job.step, state="evaluating", now=at)
    return catalog.record_model_version(
        session=s, step=job.step, models_dir=ws.models, files={}, metrics=metrics, now=at
    )


def _faded_metrics(
    rng: random.Random, learned: dict[int, float], index: int, new_ids: list[int]
) -> dict[str, Any]:
    """The candidate's metrics at step ``index``: ``new_ids`` learned now (added to ``learned``), every class
    about 3.5 IoU points lower for each step since it was learned."""
    for cid in new_ids:
        learned[cid] = rng.uniform(0.55, 0.8)
    fade = {cid: 0.035 * (index - _step_of(cid)) + rng.uniform(-0.02, 0.02) for cid in learned}
    iou = {str(cid): round(max(0.05, base - fade[cid]), 3) for cid, base in learned.items()}
    old = [v for k, v in iou.items() if int(k) not in new_ids]
    new = [iou[str(cid)] for cid in new_ids]
    m_old, m_new = sum(old) / len(old), sum(new) / len(new)
    return {
        "iou": iou,
        "miou_old": m_old,
        "miou_new": m_new,
        "miou_all": sum(iou.values()) / len(iou),
        "hiou": 2 * m_old * m_new / (m_old + m_new),
    }


def _loss_history(rng: random.Random, index: int, epochs: int = 10) -> list[dict[str, float]]:
    """Losses falling over ``epochs``; no distillation terms at step 0 (no teacher)."""
    history = [
        {
            "mbce": round(0.6 * 0.8**e + rng.uniform(0, 0.02), 4),
            "kd": 0.0 if index == 0 else round(0.15 * 0.85**e + rng.uniform(0, 0.01), 4),
            "dkd_pos": 0.0 if index == 0 else round(0.08 * 0.85**e, 4),
            "dkd_neg": 0.0 if index == 0 else round(0.05 * 0.85**e, 4),
            "ac": round(0.3 * 0.75**e, 4),
        }
        for e in range(epochs)
    ]
    for h in history:
        h["total"] = round(sum(h.values()), 4)
    return history


def _write_training_progress(job_dir: Path) -> None:
    """The progress report of the step in training, as its worker writes it."""
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / "progress.json").write_text(
        json.dumps(
            {
                "phase": "training",
                "iteration": 1130,
                "total": 3000,
                "epoch": 11,
                "epochs": 30,
                "losses": {"mbce": 0.212, "kd": 0.041, "dkd_pos": 0.018, "dkd_neg": 0.009, "total": 0.28},
                "images_per_second": 38.4,
                "eta_seconds": 1500.0,
            }
        )
    )


def _step_of(class_id: int) -> int:
    """The step that taught ``class_id`` in :data:`CLASSES` (two classes per step; 0 is background)."""
    return 0 if class_id == 0 else (class_id - 1) // 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    load = sub.add_parser("page-load", help="time the dashboard on a catalog of --steps steps")
    load.add_argument("--out", type=Path, default=Path("bench-out/web"))
    load.add_argument("--steps", type=int, default=1000)
    load.add_argument("--runs", type=int, default=10)
    load.add_argument("--workdir", type=Path, default=None, help="where to build the catalog (default: /tmp)")
    shot = sub.add_parser("screenshot", help="write the README's dashboard screenshot")
    shot.add_argument("--out", type=Path, default=Path("docs/images/dashboard.png"))
    args = parser.parse_args(argv)
    if args.command == "page-load":
        page_load(args.out, steps=args.steps, runs=args.runs, workdir=args.workdir)
    else:
        screenshot(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
