"""Benchmarks of the daemon's own figures, measured on the machine that runs them.

``python -m benchmarks.daemon {status,ingest,idle,all} [--out DIR]`` (``make bench-daemon``):

- ``status``: wall time of ``ciss status`` (and ``--json``) as a fresh process on a catalog of 1,000 steps,
  beside a bare interpreter start and ``import typer``; the in-process snapshot alone.
- ``ingest``: seconds from a complete folder to a queued step, with a real ``ciss daemon`` whose training
  window never opens (so the step stays queued): ``ciss submit``, a folder copied in by hand, a folder
  renamed in whole.
- ``idle``: CPU seconds per minute and memory of a daemon with default settings on an empty workspace.

Results are printed and written to ``results.json`` and ``results.md`` in ``--out`` (default
``bench-out/daemon``); running one section merges it into the results already there. Timings on a shared
machine are noisy, so every run records the load average next to its figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from ciss_daemon.catalog import connection, plain
from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.snapshot import status_snapshot
from ciss_daemon.catalog.tables import Batch, Class, Event, Job, ModelVersion, Rejection, Step
from ciss_daemon.workspace import Workspace, init_workspace

SECTIONS = ("status", "ingest", "idle")
DEFAULT_OUT = Path("bench-out/daemon")
# Feb 29 at 00:00 UTC: the window opens for one minute every four years, so a queued step stays queued.
NEVER_WINDOW = "0 0 29 2 *"
LOSS_TERMS = ("mbce", "kd", "dkd_pos", "dkd_neg", "ac", "total")
READY_LINE = "ciss daemon started on"


# --- small helpers ----------------------------------------------------------------------------------------


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and mean of ``values`` (seconds), rounded for reading, with the raw values."""
    return {
        "n": len(values),
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
        "mean": round(statistics.fmean(values), 4),
        "values": [round(v, 4) for v in values],
    }


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages: the other work on the machine while a figure was taken."""
    return [round(v, 2) for v in os.getloadavg()]


def cli(*args: str) -> list[str]:
    """A ``ciss`` command run by this interpreter through the installed script's entry point."""
    return [sys.executable, "-m", "ciss_daemon", *args]


def timed_run(command: Sequence[str]) -> float:
    """Wall seconds of one fresh process, from spawn to exit; a failure raises with its stderr."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()}")
    return elapsed


def machine_info(workdir: Path) -> dict[str, Any]:
    """What the figures depend on: CPU, cores, Python, SQLite and the file system of the workspaces."""
    import sqlalchemy

    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "sqlalchemy": sqlalchemy.__version__,
        "platform": platform.platform(),
        "workdir": str(workdir),
        "workdir_fs": _filesystem_type(workdir),
        "loadavg_at_start": loadavg(),
        **_code_version(),
    }


def _code_version() -> dict[str, Any]:
    """The commit measured and the files that differed from it (read-only git; empty outside a checkout)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        # rstrip only: porcelain lines start with a status column that may be a space.
        return done.stdout.rstrip() if done.returncode == 0 else ""

    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = git("rev-parse", "--short", "HEAD")
        if head:
            changed = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
            return {"git_head": head, "git_modified": changed}
    return {}


def _filesystem_type(path: Path) -> str:
    # The longest mount point that holds `path` names its file system (fsync costs differ by type).
    best, kind = "", "unknown"
    with contextlib.suppress(OSError):
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            if len(fields) >= 3 and resolved.startswith(fields[1]) and len(fields[1]) > len(best):
                best, kind = fields[1], fields[2]
    return kind


def new_workspace(root: Path, settings_text: str | None = None) -> Workspace:
    """A workspace with its catalog at schema head, as ``ciss init`` leaves it."""
    ws = init_workspace(root, settings_text=settings_text)
    connection.upgrade_catalog(f"sqlite:///{ws.catalog_path}", backup_dir=ws.backups)
    return ws


# --- a catalog of many steps ------------------------------------------------------------------------------


@dataclass(frozen=True)
class CatalogStats:
    """What :func:`build_catalog` wrote."""

    steps: int
    classes: int
    events: int
    rejections: int
    seconds: float
    bytes: int


def _iou(rng: random.Random, ids: range) -> dict[str, float]:
    # Shaped like engine.evaluate.Metrics.to_dict()["iou"]: background 0 and every known class, by string id.
    return {str(i): rng.uniform(0.3, 0.95) for i in (0, *ids)}


def _metrics(rng: random.Random, ids: range, new_from: int) -> dict[str, Any]:
    iou = _iou(rng, ids)
    old = [iou[str(i)] for i in ids if i < new_from]
    new = [iou[str(i)] for i in ids if i >= new_from]
    miou_old = statistics.fmean(old) if old else None
    miou_new = statistics.fmean(new) if new else None
    hiou = 2 * miou_old * miou_new / (miou_old + miou_new) if miou_old and miou_new else None
    return {
        "iou": iou,
        "miou_old": miou_old,
        "miou_new": miou_new,
        "miou_all": statistics.fmean(iou[str(i)] for i in ids),
        "hiou": hiou,
    }


def build_catalog(
    ws: Workspace,
    *,
    steps: int,
    classes_per_step: int = 3,
    seed: int = 0,
    now: dt.datetime | None = None,
    url: str | None = None,
) -> CatalogStats:
    """Fill the (empty, upgraded) catalog of ``ws`` with ``steps`` promoted steps, as a long-lived daemon
    would have left it: one batch of ``classes_per_step`` classes per step, a done job with its last progress
    report, a model version with full metrics (per-class IoU of every known class, candidate and current,
    and the loss history), three or four events per step, and a rejection every 20 steps.

    Rows go in with bulk inserts in one transaction: the catalog functions re-number every class on each
    new batch (``_compact_class_ids``), which makes building 1,000 steps through them quadratic. The rows
    keep the catalog's invariants (contiguous class ids in step order, one current model, retired
    predecessors), so every reader sees what the daemon writes. No model files are written. ``url``: another
    catalog than the workspace's SQLite file (e.g. PostgreSQL; its ``bytes`` are then 0).
    """
    rng = random.Random(seed)
    end = now or catalog.utcnow()
    every = dt.timedelta(hours=6)  # one step every six hours, the last one just finished
    start = end - every * steps
    batches: list[dict[str, Any]] = []
    step_rows: list[dict[str, Any]] = []
    classes: list[dict[str, Any]] = []
    jobs: list[dict[str, Any]] = []
    versions: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    rejections: list[dict[str, Any]] = []
    next_class = 1
    for index in range(steps):
        received = start + every * index
        trained = received + dt.timedelta(minutes=1)
        finished = received + dt.timedelta(hours=2)
        name = f"bench-{index:04d}"
        sha = hashlib.sha256(name.encode()).hexdigest()
        ids = range(next_class, next_class + classes_per_step)
        names = {str(v + 1): f"class-{cid:05d}" for v, cid in enumerate(ids)}
        row_id = index + 1
        batches.append(
            {
                "id": row_id,
                "name": name,
                "kind": "train",
                "sha256": sha,
                "received_at": received,
                "store_path": str(ws.store / f"{name}-{sha[:8]}"),
                "class_names": names,
                "value_map": {v: cid for v, cid in zip(names, ids, strict=True)},
                "n_train": 40,
                "n_val": 10,
            }
        )
        step_rows.append(
            {
                "id": row_id,
                "index": index,
                "batch_id": row_id,
                "state": "promoted",
                "reason": "old-class mIoU within budget and new classes above the floor",
                "created_at": received,
                "updated_at": finished,
            }
        )
        classes += [
            {
                "id": cid,
                "name": names[v],
                "batch_id": row_id,
                "step_id": row_id,
                "taught": True,
                "created_at": received,
            }
            for v, cid in zip(names, ids, strict=True)
        ]
        attempts = 2 if index % 25 == 7 else 1
        jobs.append(
            {
                "id": row_id,
                "step_id": row_id,
                "state": "done",
                "attempts": attempts,
                "max_attempts": 3,
                "pid": None,
                "progress": {
                    "phase": "evaluating",
                    "updated_at": finished.timestamp(),
                    "iteration": 300,
                    "total": 300,
                    "epoch": 29,
                    "epochs": 30,
                    "losses": {term: rng.uniform(0.01, 1.0) for term in LOSS_TERMS},
                    "lr": 1e-5,
                    "images_per_second": 41.5,
                    "eta_seconds": 0.0,
                },
                "created_at": received,
                "started_at": trained,
                "heartbeat_at": finished,
                "finished_at": finished,
                "error": "the daemon restarted during training" if attempts > 1 else None,
                "workdir": str(ws.jobs / str(row_id)),
            }
        )
        version = f"v{row_id:04d}"
        known = range(1, ids.stop)
        versions.append(
            {
                "id": row_id,
                "version": version,
                "step_id": row_id,
                "path": str(ws.models / version),
                "files": {
                    "model.safetensors": hashlib.sha256(f"{version}/w".encode()).hexdigest(),
                    "model.json": hashlib.sha256(f"{version}/j".encode()).hexdigest(),
                },
                "metrics": {
                    "candidate": _metrics(rng, known, ids.start),
                    "current": _metrics(rng, range(1, ids.start), ids.start) if index else None,
                    "history": [{t: rng.uniform(0.01, 1.0) for t in LOSS_TERMS} for _ in range(30)],
                },
                "created_at": finished,
                "promoted_at": finished,
                "is_current": index == steps - 1,
                "state": "promoted" if index == steps - 1 else "retired",
            }
        )
        listed = ", ".join(names.values())
        events += [
            _event(received, "accepted", f"batch {name!r} accepted as step {index} ({listed})", row_id),
            _event(trained, "training", f"step {index} training started (attempt 1 of 3)", row_id),
        ]
        if attempts > 1:
            events.append(
                _event(
                    trained + dt.timedelta(minutes=30),
                    "requeued",
                    f"step {index}: the daemon restarted during training; it resumes from its checkpoint",
                    row_id,
                    level="warning",
                )
            )
        events.append(
            _event(
                finished,
                "promoted",
                f"step {index}: {version} promoted (old-class mIoU within budget)",
                row_id,
            )
        )
        if index % 20 == 10:
            bad = f"bad-{index:04d}"
            reasons = [f"masks/{i:04d}.png: value {7 + i} is not declared in batch.toml" for i in range(3)]
            rejections.append(
                {
                    "batch_name": bad,
                    "sha256": None,
                    "reasons": reasons,
                    "path": str(ws.rejected / bad),
                    "created_at": received + dt.timedelta(minutes=5),
                }
            )
            events.append(
                _event(
                    received + dt.timedelta(minutes=5),
                    "rejected",
                    f"batch {bad!r} rejected: {reasons[0]} (and 2 more)",
                    None,
                    level="warning",
                )
            )
        next_class = ids.stop

    started = time.perf_counter()
    engine = connection.make_engine(url or f"sqlite:///{ws.catalog_path}")
    try:
        with connection.transaction(connection.session_factory(engine)) as session:
            # Parents first: foreign keys are on, as in every catalog connection.
            for model, rows in (
                (Batch, batches),
                (Step, step_rows),
                (Class, classes),
                (Job, jobs),
                (ModelVersion, versions),
                (Event, events),
                (Rejection, rejections),
            ):
                if rows:
                    session.execute(insert(model), rows)
    finally:
        engine.dispose()
    seconds = time.perf_counter() - started
    size = sum(p.stat().st_size for p in ws.root.glob("catalog.sqlite*"))
    return CatalogStats(steps, len(classes), len(events), len(rejections), seconds, size)


def _event(
    at: dt.datetime, kind: str, message: str, step_id: int | None, *, level: str = "info"
) -> dict[str, Any]:
    return {"at": at, "level": level, "kind": kind, "message": message, "step_id": step_id}


def make_status_workspace(root: Path, *, steps: int) -> tuple[Workspace, CatalogStats]:
    """A new workspace at ``root`` whose catalog holds ``steps`` promoted steps."""
    ws = new_workspace(root)
    return ws, build_catalog(ws, steps=steps)


# --- 1. ciss status ---------------------------------------------------------------------------------------


def bench_status(workdir: Path, *, steps: int, runs: int) -> dict[str, Any]:
    """``ciss status`` and ``--json`` as fresh processes, interpreter baselines, the snapshot in-process."""
    ws, stats = make_status_workspace(workdir / "status-ws", steps=steps)
    result: dict[str, Any] = {
        "steps": stats.steps,
        "classes": stats.classes,
        "events": stats.events,
        "rejections": stats.rejections,
        "catalog_build_seconds": round(stats.seconds, 2),
        "catalog_bytes": stats.bytes,
        "runs": runs,
        "loadavg_before": loadavg(),
    }
    workspace = str(ws.root)
    commands = {
        "python -c pass": [sys.executable, "-c", "pass"],
        'python -c "import typer"': [sys.executable, "-c", "import typer"],
        'python -c "import ciss_daemon.cli"': [sys.executable, "-c", "import ciss_daemon.cli"],
        "ciss status": cli("status", "--workspace", workspace),
        "ciss status --json": cli("status", "--json", "--workspace", workspace),
    }
    processes: dict[str, Any] = {}
    for label, command in commands.items():
        first = timed_run(command)  # page cache and .pyc warm-up; kept apart from the runs
        processes[label] = {
            "first_run": round(first, 4),
            **summary([timed_run(command) for _ in range(runs)]),
        }
    result["processes"] = processes

    data = json.loads(subprocess.run(commands["ciss status --json"], capture_output=True, check=True).stdout)
    result["json_steps"] = len(data["steps"])
    result["json_bytes"] = len(json.dumps(data, indent=2))
    result["in_process"] = _in_process_snapshot(ws, runs)
    result["torch_imported_by_status"] = _status_imports_torch(workspace)
    result["imports"] = _top_imports(commands["ciss status"])
    result["loadavg_after"] = loadavg()
    return result


def _in_process_snapshot(ws: Workspace, runs: int) -> dict[str, Any]:
    """snapshot.status_snapshot alone (plain SQL through sqlite3, as ``ciss status`` reads), and with the
    rich rendering, in this process (modules already imported)."""
    import io

    from rich.console import Console

    from ciss_daemon import status as status_view
    from ciss_daemon import views

    url = f"sqlite:///{ws.catalog_path}"
    with plain.reading(url) as read:
        status_snapshot(read)  # page cache
    snapshot_times, render_times = [], []
    for _ in range(runs):
        start = time.perf_counter()
        with plain.reading(url) as read:
            status_snapshot(read)
        snapshot_times.append(time.perf_counter() - start)
    for _ in range(runs):
        start = time.perf_counter()
        console = Console(file=io.StringIO(), width=120)
        with plain.reading(url) as read:
            console.print(views.render(status_view.snapshot(ws, read), ws))
        render_times.append(time.perf_counter() - start)
    return {"status_snapshot": summary(snapshot_times), "snapshot_and_render": summary(render_times)}


def _status_imports_torch(workspace: str) -> bool:
    """Whether running ``ciss status`` loads torch (docs/product.md: it must not)."""
    code = (
        "import sys, io, contextlib\n"
        "from ciss_daemon.entry import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    main(['status', '--workspace', {workspace!r}])\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return out.strip().splitlines()[-1] == "True"


def _top_imports(command: Sequence[str], top: int = 8) -> dict[str, Any]:
    """What imports cost ``command`` (``python -X importtime``, which adds its own overhead): the total over
    every import made at top level or inside a function, and the costliest ones, cumulative ms."""
    done = subprocess.run(
        [command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True, check=True
    )
    rows = []
    for line in done.stderr.splitlines():
        # "import time: <self us> | <cumulative us> | <name>", nested imports indented under their parent.
        parts = line.split("|")
        if len(parts) != 3 or not parts[1].strip().isdigit():
            continue
        cumulative, name = int(parts[1]), parts[2]
        # Only modules imported at top level add up to the total; deeper ones are counted in them.
        if name.startswith("  "):
            continue
        rows.append({"module": name.strip(), "ms": round(cumulative / 1000, 1)})
    ranked = sorted(rows, key=lambda r: r["ms"], reverse=True)
    return {"total_ms": round(sum(r["ms"] for r in rows), 1), "top": ranked[:top]}


# --- a daemon process -------------------------------------------------------------------------------------


class DaemonProcess:
    """``ciss daemon`` on a workspace, in its own process, logging to ``daemon.log`` in the workspace."""

    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.log_path = ws.root / "daemon.log"
        self.log = self.log_path.open("ab")
        self.started = time.perf_counter()
        self.process = subprocess.Popen(
            cli("daemon", "--workspace", str(ws.root)), stdout=self.log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = 120) -> float:
        """Seconds from spawn until the daemon logs that it started (lock, catalog, recovery, timers)."""
        deadline = time.monotonic() + timeout
        while READY_LINE not in self.log_path.read_text(errors="replace"):
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready after {timeout} s; see {self.log_path}")
            time.sleep(0.02)
        return time.perf_counter() - self.started

    def stop(self) -> int | None:
        """SIGTERM and wait; SIGKILL only if it does not stop in time. Returns its exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self.log.close()
        return self.process.returncode


@contextlib.contextmanager
def running_daemon(ws: Workspace) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(ws)
    try:
        yield daemon
    finally:
        daemon.stop()


# --- 2. folder to queued step -----------------------------------------------------------------------------


def check_window_closed(ws: Workspace, expression: str) -> dict[str, Any]:
    """Run the daemon's own ``window_open`` on ``expression``: closed now, open at its next fire time.

    The second check proves the test can tell open from closed, so "closed now" is not a vacuous pass.
    """
    from apscheduler.triggers.cron import CronTrigger

    from ciss_daemon.service.daemon import Daemon
    from ciss_daemon.settings import load_settings

    daemon = Daemon(ws, load_settings(ws.settings_path), watch=False)
    daemon.window = CronTrigger.from_crontab(expression, timezone=dt.UTC)
    now = dt.datetime.now(dt.UTC)
    fire = daemon.window.get_next_fire_time(None, now)
    inside = fire + dt.timedelta(seconds=30) if fire is not None else None
    return {
        "expression": expression,
        "open_now": daemon.window_open(now),
        "next_opening": None if fire is None else fire.isoformat(),
        "open_30s_after_next_opening": None if inside is None else daemon.window_open(inside),
    }


def make_batch(root: Path, name: str, seed: int) -> Path:
    """A small generated training batch named ``name`` whose class names are unique to it.

    Class names taught or pending in the catalog are refused, and every step of this benchmark stays
    queued (pending), so each batch renames the generator's classes.
    """
    from engine.synthetic import generate_batches

    (folder,) = generate_batches(
        root / name, "2", train_per_step=4, val_per_step=2, image_size=32, seed=seed, prefix=name
    )
    # The generator names its folder <prefix>-00-base; the batch takes the folder's name.
    folder = folder.rename(folder.parent / name)
    manifest = folder / "batch.toml"
    classes = tomllib.loads(manifest.read_text())["classes"]
    lines = ['kind = "train"', "", "[classes]"] + [f'{v} = "{n}-{name}"' for v, n in classes.items()]
    staged = folder / ".batch.toml.tmp"
    staged.write_text("\n".join(lines) + "\n")
    os.replace(staged, manifest)
    return folder


def _catalog_step(db: sqlite3.Connection, name: str) -> tuple[str | None, float | None, bool]:
    """(state, created_at as a Unix time, rejected?) of the step learning batch ``name``."""
    row = db.execute(
        "SELECT s.state, s.created_at FROM steps s JOIN batches b ON s.batch_id = b.id WHERE b.name = ?",
        (name,),
    ).fetchone()
    rejected = db.execute("SELECT 1 FROM rejections WHERE batch_name = ?", (name,)).fetchone() is not None
    if row is None:
        return None, None, rejected
    created = dt.datetime.fromisoformat(row[1])
    created = created.replace(tzinfo=dt.UTC) if created.tzinfo is None else created
    return row[0], created.timestamp(), rejected


def wait_queued(db: sqlite3.Connection, name: str, timeout: float = 120) -> tuple[float, float, str]:
    """Poll the catalog every 20 ms until batch ``name`` is a step: (time seen, step created_at, state)."""
    deadline = time.monotonic() + timeout
    while True:
        state, created, rejected = _catalog_step(db, name)
        if state is not None and created is not None:
            return time.time(), created, state
        if rejected:
            raise RuntimeError(f"batch {name} was rejected; see rejected/{name}/REJECTED.txt")
        if time.monotonic() > deadline:
            raise RuntimeError(f"batch {name} not in the catalog after {timeout} s")
        time.sleep(0.02)


def bench_ingest(workdir: Path, *, reps: int) -> dict[str, Any]:
    """Seconds from a complete folder to a queued step, three ways, with a daemon that never trains."""
    ws = new_workspace(workdir / "ingest-ws", f'[daemon]\ntraining_window = "{NEVER_WINDOW}"\n')
    from ciss_daemon.settings import load_settings

    settings = load_settings(ws.settings_path).daemon
    sources = workdir / "ingest-src"
    outside = ws.root / "outside-inbox"  # same file system as the inbox, for the rename case
    outside.mkdir()
    result: dict[str, Any] = {
        "settings": {
            "settle_seconds": settings.settle_seconds,
            "rescan_seconds": settings.rescan_seconds,
            "dispatch_seconds": settings.dispatch_seconds,
            "training_window": settings.training_window,
        },
        "window_check": check_window_closed(ws, NEVER_WINDOW),
        "loadavg_before": loadavg(),
    }
    jitter = random.Random(1)
    modes: dict[str, Callable[[Path], float]] = {
        # Each returns the wall time at which the folder became complete in the inbox.
        "submit": lambda folder: _submit(ws, folder),
        "copytree": lambda folder: _copy_in(ws, folder),
        "rename": lambda folder: _rename_in(ws, folder, outside),
    }
    samples: dict[str, list[dict[str, float]]] = {mode: [] for mode in modes}
    states: dict[str, set[str]] = {mode: set() for mode in modes}
    with running_daemon(ws) as daemon:
        result["daemon_ready_seconds"] = round(daemon.wait_ready(), 3)
        db = sqlite3.connect(ws.catalog_path, timeout=5)
        try:
            seed = 100
            for rep in range(reps):
                for mode, drop in modes.items():
                    seed += 1
                    name = f"{mode}-{rep}"
                    folder = make_batch(sources, name, seed)
                    # The daemon ticks every dispatch_seconds: a random pause spreads drops over its phase.
                    time.sleep(jitter.uniform(0.5, 2.5))
                    began = time.time()
                    complete = drop(folder)
                    seen, created, state = wait_queued(db, name)
                    samples[mode].append(
                        {
                            "total": seen - began,
                            "from_complete": seen - complete,
                            "until_accepting_tick": created - complete,
                            "ingest": seen - created,
                        }
                    )
                    states[mode].add(state)
            final = db.execute(
                "SELECT s.state, count(*), max(j.attempts) FROM steps s JOIN jobs j ON j.step_id = s.id "
                "GROUP BY s.state"
            ).fetchall()
        finally:
            db.close()
        result["daemon_alive_at_end"] = daemon.process.poll() is None
    result["final_states"] = [{"state": s, "steps": n, "max_attempts_used": a} for s, n, a in final]
    result["modes"] = {
        mode: {key: summary([s[key] for s in rows]) for key in rows[0]}
        | {"states_seen": sorted(states[mode])}
        for mode, rows in samples.items()
    }
    result["loadavg_after"] = loadavg()
    return result


def _submit(ws: Workspace, folder: Path) -> float:
    """Run ``ciss submit`` as a user does; return when its folder appeared in the inbox.

    The folder is complete the moment the command renames it in, which is before the command exits (and
    the daemon may already be ingesting it), so a thread watches for it every 2 ms rather than taking the
    command's return as the moment.
    """
    target = ws.inbox / folder.name
    appeared: list[float] = []
    done_event = threading.Event()

    def watch() -> None:
        while not done_event.is_set():
            if os.path.lexists(target):
                appeared.append(time.time())
                return
            time.sleep(0.002)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        done = subprocess.run(
            cli("submit", str(folder), "--workspace", str(ws.root)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        done_event.set()
        watcher.join()
    if done.returncode != 0:
        raise RuntimeError(f"ciss submit {folder} failed: {done.stderr.strip()}")
    # Not seen only if the daemon took the folder out within one poll: the return is then an upper bound.
    return appeared[0] if appeared else time.time()


def _copy_in(ws: Workspace, folder: Path) -> float:
    # A copy by hand (cp -r): complete once the last file is written; the daemon must see it settle.
    shutil.copytree(folder, ws.inbox / folder.name)
    return time.time()


def _rename_in(ws: Workspace, folder: Path, outside: Path) -> float:
    # Prepared beside the inbox on the same file system, then moved in whole with one rename.
    prepared = outside / folder.name
    shutil.copytree(folder, prepared)
    os.rename(prepared, ws.inbox / folder.name)
    return time.time()


# --- 3. idle CPU ------------------------------------------------------------------------------------------


def _proc_cpu(pid: int) -> tuple[float, float]:
    """(own utime + stime, reaped children's cutime + cstime) of ``pid``, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces; skip past it
    tick = os.sysconf("SC_CLK_TCK")
    # After the name: state is field 3 of the man page, utime 14, stime 15, cutime 16, cstime 17.
    utime, stime, cutime, cstime = (int(fields[i - 3]) for i in (14, 15, 16, 17))
    return (utime + stime) / tick, (cutime + cstime) / tick


def _children(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (through each thread's ``children`` list)."""
    found: list[int] = []
    pending = [pid]
    while pending:
        parent = pending.pop()
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{parent}/task").iterdir():
                with contextlib.suppress(OSError):
                    kids = [int(k) for k in (task / "children").read_text().split()]
                    found += kids
                    pending += kids
    return found


def _status_fields(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM (kB) and Threads from /proc/<pid>/status."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            values[key] = int(rest.split()[0])
    return values


def _cpu_total(pid: int) -> dict[str, float]:
    own, reaped = _proc_cpu(pid)
    live = 0.0
    for child in _children(pid):
        with contextlib.suppress(OSError, ValueError):
            live += _proc_cpu(child)[0]
    return {"own": own, "children": reaped + live}


def bench_idle(workdir: Path, *, seconds: float, settle: float) -> dict[str, Any]:
    """CPU and memory of ``ciss daemon`` with default settings on an empty workspace, once settled."""
    ws = new_workspace(workdir / "idle-ws")
    result: dict[str, Any] = {
        "window_seconds": seconds,
        "settle_seconds": settle,
        "loadavg_before": loadavg(),
    }
    with running_daemon(ws) as daemon:
        result["daemon_ready_seconds"] = round(daemon.wait_ready(), 3)
        time.sleep(settle)
        pid = daemon.pid
        first = _cpu_total(pid)
        start = time.monotonic()
        series = []
        while (elapsed := time.monotonic() - start) < seconds:
            time.sleep(min(5.0, seconds - elapsed))
            now = _cpu_total(pid)
            series.append(
                {
                    "t": round(time.monotonic() - start, 2),
                    "own": round(now["own"] - first["own"], 3),
                    "children": round(now["children"] - first["children"], 3),
                }
            )
        window = time.monotonic() - start
        last = _cpu_total(pid)
        memory = _status_fields(pid)
        maps = Path(f"/proc/{pid}/maps").read_text()
        result["children_at_end"] = len(_children(pid))
        result["torch_loaded"] = "libtorch" in maps
        result["daemon_alive_at_end"] = daemon.process.poll() is None
    used = (last["own"] - first["own"]) + (last["children"] - first["children"])
    result |= {
        "measured_seconds": round(window, 2),
        "cpu_seconds": round(used, 3),
        "cpu_seconds_own": round(last["own"] - first["own"], 3),
        "cpu_seconds_children": round(last["children"] - first["children"], 3),
        "cpu_seconds_per_minute": round(used / window * 60, 3),
        "percent_of_one_core": round(100 * used / window, 3),
        "clock_tick_seconds": round(1 / os.sysconf("SC_CLK_TCK"), 4),
        "rss_mib": round(memory.get("VmRSS", 0) / 1024, 1),
        "peak_rss_mib": round(memory.get("VmHWM", 0) / 1024, 1),
        "threads": memory.get("Threads"),
        "series": series,
        "loadavg_after": loadavg(),
    }
    return result


# --- output -----------------------------------------------------------------------------------------------


def _row(label: str, s: dict[str, Any]) -> str:
    return f"| {label} | {s['median']:.3f} | {s['min']:.3f} | {s['max']:.3f} | {s['n']} |"


def _taken(section: dict[str, Any]) -> list[str]:
    if "command" not in section:
        return []
    return ["", f"Command: `{section['command']}`, taken {section['taken_at']}."]


def render_markdown(results: dict[str, Any]) -> str:
    """``results.md``: the figures as tables, with the machine and the command."""
    m = results["machine"]
    lines = [
        "# Daemon benchmarks",
        "",
        f"Last command: `{results['command']}`, taken {results['taken_at']}.  ",
        f"Machine: {m['cpu_model']}, {m['usable_cpus']} usable of {m['logical_cpus']} logical CPUs; "
        f"Python {m['python']}; SQLite {m['sqlite']}; SQLAlchemy {m['sqlalchemy']}; {m['platform']}; "
        f"workspaces on {m['workdir_fs']}. Load average at start {m['loadavg_at_start']}.",
    ]
    if m.get("git_head"):
        modified = ", ".join(m.get("git_modified") or []) or "none"
        lines[-1] += f"  \nCode: commit {m['git_head']}; files modified since: {modified}."
    st = results.get("status")
    if st:
        lines += [
            "",
            f"## `ciss status` with {st['steps']} steps",
            *_taken(st),
            "",
            f"Catalog: {st['steps']} promoted steps, {st['classes']} classes, {st['events']} events, "
            f"{st['rejections']} rejections, full metrics per model version; "
            f"{st['catalog_bytes'] / 2**20:.1f} MiB, built in {st['catalog_build_seconds']} s. "
            f"`--json` lists {st['json_steps']} steps ({st['json_bytes'] / 1024:.0f} KiB). "
            f"Load average {st['loadavg_before']} -> {st['loadavg_after']}.",
            "",
            "Fresh process, wall seconds (one warm-up run not counted):",
            "",
            "| command | median | min | max | runs |",
            "|---|---|---|---|---|",
        ]
        lines += [_row(f"`{label}`", s) for label, s in st["processes"].items()]
        ip = st["in_process"]
        lines += [
            "",
            "In process (catalog already open):",
            "",
            "| what | median | min | max | runs |",
            "|---|---|---|---|---|",
            _row("`snapshot.status_snapshot`", ip["status_snapshot"]),
            _row("snapshot + rich render", ip["snapshot_and_render"]),
            "",
            f"torch imported by `ciss status`: {'yes' if st['torch_imported_by_status'] else 'no'}. "
            f"Imports of one `ciss status` (`-X importtime`, which inflates them): "
            f"{st['imports']['total_ms']:.0f} ms in all; costliest, cumulative ms: "
            + ", ".join(f"{r['module']} {r['ms']}" for r in st["imports"]["top"])
            + ".",
        ]
    ing = results.get("ingest")
    if ing:
        s, w = ing["settings"], ing["window_check"]
        lines += [
            "",
            "## Complete folder to queued step",
            *_taken(ing),
            "",
            f'`ciss daemon` with default settings except `training_window = "{s["training_window"]}"` '
            f"(settle_seconds {s['settle_seconds']}, dispatch_seconds {s['dispatch_seconds']}, "
            f"rescan_seconds {s['rescan_seconds']}). Window check with `Daemon.window_open`: open now "
            f"{w['open_now']}, open 30 s after its next opening ({w['next_opening']}) "
            f"{w['open_30s_after_next_opening']}. Steps at the end: "
            + ", ".join(
                f"{r['steps']} {r['state']} (most attempts {r['max_attempts_used']})"
                for r in ing["final_states"]
            )
            + f". Daemon ready {ing['daemon_ready_seconds']} s after spawn.",
            "",
            "Seconds from the folder being complete in the inbox to the step visible as queued in the "
            "catalog (polled every 20 ms). Complete means: submit, the renamed folder appeared in the inbox "
            "(watched every 2 ms); copytree, the copy returned; rename, `os.rename` returned. `until tick` "
            "is up to the start of the daemon iteration that accepted it (the step's created_at), `ingest` "
            "is validation, store copy and commit.",
            "",
            "| how | median | min | max | each run | until tick (median) | ingest (median) |",
            "|---|---|---|---|---|---|---|",
        ]
        for mode, r in ing["modes"].items():
            fc = r["from_complete"]
            lines.append(
                f"| {mode} | {fc['median']:.2f} | {fc['min']:.2f} | {fc['max']:.2f} | "
                f"{', '.join(f'{v:.2f}' for v in fc['values'])} | "
                f"{r['until_accepting_tick']['median']:.2f} | {r['ingest']['median']:.2f} |"
            )
        sub = ing["modes"].get("submit")
        if sub:
            lines.append(
                f"\n`ciss submit` including the command itself (spawn, copy, fsync, rename): median "
                f"{sub['total']['median']:.2f} s (min {sub['total']['min']:.2f}, "
                f"max {sub['total']['max']:.2f})."
            )
    idle = results.get("idle")
    if idle:
        lines += [
            "",
            "## Idle daemon",
            *_taken(idle),
            "",
            f"Default settings, empty workspace, {idle['settle_seconds']} s to settle after start-up "
            f"(ready {idle['daemon_ready_seconds']} s after spawn), then {idle['measured_seconds']} s "
            f"measured from /proc (clock tick {idle['clock_tick_seconds']} s).",
            "",
            "| figure | value |",
            "|---|---|",
            f"| CPU seconds per minute | {idle['cpu_seconds_per_minute']:.3f} |",
            f"| percent of one core | {idle['percent_of_one_core']:.3f} % |",
            f"| CPU seconds (own / children) | {idle['cpu_seconds_own']:.2f} / "
            f"{idle['cpu_seconds_children']:.2f} |",
            f"| RSS / peak RSS | {idle['rss_mib']} MiB / {idle['peak_rss_mib']} MiB |",
            f"| threads / child processes | {idle['threads']} / {idle['children_at_end']} |",
            f"| torch loaded | {'yes' if idle['torch_loaded'] else 'no'} |",
        ]
    return "\n".join(lines) + "\n"


def print_table(results: dict[str, Any], sections: Sequence[str]) -> None:
    """The figures of this run on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ciss daemon benchmarks", title_justify="left")
    for column in ("figure", "median", "min", "max", "n"):
        table.add_column(column)

    def add(label: str, s: dict[str, Any], unit: str = "s") -> None:
        table.add_row(label, f"{s['median']:.3f} {unit}", f"{s['min']:.3f}", f"{s['max']:.3f}", str(s["n"]))

    if "status" in sections:
        st = results["status"]
        for label, s in st["processes"].items():
            add(f"{label} ({st['steps']} steps)" if "status" in label else label, s)
        add("in-process status_snapshot", st["in_process"]["status_snapshot"])
    if "ingest" in sections:
        for mode, r in results["ingest"]["modes"].items():
            add(f"complete folder -> queued: {mode}", r["from_complete"])
    if "idle" in sections:
        idle = results["idle"]
        table.add_row(
            "idle daemon CPU",
            f"{idle['cpu_seconds_per_minute']:.3f} s/min ({idle['percent_of_one_core']:.2f} % core)",
            "",
            "",
            f"{idle['measured_seconds']:.0f} s",
        )
        table.add_row("idle daemon RSS", f"{idle['rss_mib']} MiB", "", "", "")
    # Piped output (make, CI logs) would wrap at 80 columns; a terminal keeps its own width.
    Console(width=None if sys.stdout.isatty() else 110).print(table)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.daemon", description=__doc__.split("\n\n")[0] if __doc__ else None
    )
    parser.add_argument("section", choices=(*SECTIONS, "all"), help="Which figures to measure.")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Folder for results.json/.md.")
    parser.add_argument("--steps", type=int, default=1000, help="Steps in the status catalog.")
    parser.add_argument("--runs", type=int, default=10, help="Timed runs of each status command.")
    parser.add_argument("--reps", type=int, default=5, help="Drops per way of handing in a folder.")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="Idle measurement window.")
    parser.add_argument("--settle", type=float, default=5.0, help="Seconds to let the daemon settle.")
    parser.add_argument("--workdir", type=Path, default=None, help="Where workspaces go (default: temp).")
    parser.add_argument("--keep", action="store_true", help="Keep the workspaces afterwards.")
    args = parser.parse_args(argv)
    sections = SECTIONS if args.section == "all" else (args.section,)

    workdir = Path(tempfile.mkdtemp(prefix="ciss-bench-", dir=args.workdir)).resolve()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "results.json"
    # Sections run one by one merge into what an earlier run left, so `status` then `idle` adds up.
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.exists() else {}
    results |= {
        "command": " ".join(["python -m benchmarks.daemon", *(argv if argv is not None else sys.argv[1:])]),
        "taken_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(workdir),
    }
    try:
        for section in sections:
            print(f"measuring {section} ...", file=sys.stderr, flush=True)
            if section == "status":
                results["status"] = bench_status(workdir, steps=args.steps, runs=args.runs)
            elif section == "ingest":
                results["ingest"] = bench_ingest(workdir, reps=args.reps)
            else:
                results["idle"] = bench_idle(workdir, seconds=args.idle_seconds, settle=args.settle)
            # Each section keeps the command and time it was taken with: sections merge across runs.
            results[section] |= {"command": results["command"], "taken_at": results["taken_at"]}
            # Written after each section, so a later failure keeps what was measured.
            results_path.write_text(json.dumps(results, indent=2) + "\n")
            (out / "results.md").write_text(render_markdown(results))
    finally:
        if args.keep:
            print(f"workspaces kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    print_table(results, sections)
    print(f"results in {results_path} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
