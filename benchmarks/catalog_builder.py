"""A catalog of many steps, as a long-lived daemon leaves it, written in bulk for the benchmarks.

The ``ciss status`` benchmark, the dashboard's page load and ``ciss status`` on PostgreSQL all read the same
history: ``steps`` promoted steps with full metrics, jobs, events and rejections, built by
:func:`build_catalog` with bulk inserts in one transaction, not through the catalog's functions.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import insert

from benchmarks.measure import new_workspace
from ciss_daemon.catalog import connection
from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.tables import Batch, Class, Event, Job, ModelVersion, Rejection, Step
from ciss_daemon.workspace import Workspace

LOSS_TERMS = ("mbce", "kd", "dkd_pos", "dkd_neg", "ac", "total")


@dataclass(frozen=True)
class CatalogStats:
    """What :func:`build_catalog` wrote."""

    steps: int
    classes: int
    events: int
    rejections: int
    seconds: float
    bytes: int


@dataclass
class _Rows:
    """The rows of every table, in the order the bulk inserts take them (parents first)."""

    batches: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    classes: list[dict[str, Any]] = field(default_factory=list)
    jobs: list[dict[str, Any]] = field(default_factory=list)
    versions: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    rejections: list[dict[str, Any]] = field(default_factory=list)


@dataclass(frozen=True)
class _StepTimes:
    """When one step's batch arrived, its training started and it was promoted."""

    received: dt.datetime
    trained: dt.datetime
    finished: dt.datetime


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
    rows = _Rows()
    next_class = 1
    for index in range(steps):
        received = start + every * index
        times = _StepTimes(received, received + dt.timedelta(minutes=1), received + dt.timedelta(hours=2))
        ids = range(next_class, next_class + classes_per_step)
        _add_step(rows, ws, rng, index=index, ids=ids, times=times, last=index == steps - 1)
        next_class = ids.stop
    seconds = _insert(rows, url or f"sqlite:///{ws.catalog_path}")
    size = sum(p.stat().st_size for p in ws.root.glob("catalog.sqlite*"))
    return CatalogStats(steps, len(rows.classes), len(rows.events), len(rows.rejections), seconds, size)


def _add_step(
    rows: _Rows, ws: Workspace, rng: random.Random, *, index: int, ids: range, times: _StepTimes, last: bool
) -> None:
    """The rows of step ``index``, promoted (and current when ``last``), teaching the classes ``ids``."""
    name = f"bench-{index:04d}"
    sha = hashlib.sha256(name.encode()).hexdigest()
    names = {str(v + 1): f"class-{cid:05d}" for v, cid in enumerate(ids)}
    row_id = index + 1
    rows.batches.append(
        {
            "id": row_id,
            "name": name,
            "kind": "train",
            "sha256": sha,
            "received_at": times.received,
            "store_path": str(ws.store / f"{name}-{sha[:8]}"),
            "class_names": names,
            "value_map": {v: cid for v, cid in zip(names, ids, strict=True)},
            "n_train": 40,
            "n_val": 10,
        }
    )
    rows.steps.append(
        {
            "id": row_id,
            "index": index,
            "batch_id": row_id,
            "state": "promoted",
            "reason": "old-class mIoU within budget and new classes above the floor",
            "created_at": times.received,
            "updated_at": times.finished,
        }
    )
    rows.classes += [
        {
            "id": cid,
            "name": names[v],
            "batch_id": row_id,
            "step_id": row_id,
            "taught": True,
            "created_at": times.received,
        }
        for v, cid in zip(names, ids, strict=True)
    ]
    # The draws keep their order (job losses, then the version's metrics): the same seed, the same rows.
    attempts = 2 if index % 25 == 7 else 1
    rows.jobs.append(_job_row(ws, rng, row_id, attempts, times))
    version = _version_row(ws, rng, index=index, ids=ids, finished=times.finished, last=last)
    rows.versions.append(version)
    rows.events += _step_events(index, name, ", ".join(names.values()), version["version"], attempts, times)
    if index % 20 == 10:
        _add_rejection(rows, ws, index, times.received + dt.timedelta(minutes=5))


def _job_row(
    ws: Workspace, rng: random.Random, row_id: int, attempts: int, times: _StepTimes
) -> dict[str, Any]:
    """A done job with its last progress report; a second attempt after a daemon restart when ``attempts``
    is 2."""
    return {
        "id": row_id,
        "step_id": row_id,
        "state": "done",
        "attempts": attempts,
        "max_attempts": 3,
        "pid": None,
        "progress": {
            "phase": "evaluating",
            "updated_at": times.finished.timestamp(),
            "iteration": 300,
            "total": 300,
            "epoch": 29,
            "epochs": 30,
            "losses": {term: rng.uniform(0.01, 1.0) for term in LOSS_TERMS},
            "lr": 1e-5,
            "images_per_second": 41.5,
            "eta_seconds": 0.0,
        },
        "created_at": times.received,
        "started_at": times.trained,
        "heartbeat_at": times.finished,
        "finished_at": times.finished,
        "error": "the daemon restarted during training" if attempts > 1 else None,
        "workdir": str(ws.jobs / str(row_id)),
    }


def _version_row(
    ws: Workspace, rng: random.Random, *, index: int, ids: range, finished: dt.datetime, last: bool
) -> dict[str, Any]:
    """The model version of step ``index``: metrics of the candidate over every known class and of the
    current model before it, 30 epochs of losses; the current one when ``last``, else retired."""
    row_id = index + 1
    version = f"v{row_id:04d}"
    known = range(1, ids.stop)
    return {
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
        "is_current": last,
        "state": "promoted" if last else "retired",
    }


def _step_events(
    index: int, name: str, listed: str, version: str, attempts: int, times: _StepTimes
) -> list[dict[str, Any]]:
    """Accepted, training, requeued after a restart (on a second attempt), promoted."""
    row_id = index + 1
    events = [
        _event(times.received, "accepted", f"batch {name!r} accepted as step {index} ({listed})", row_id),
        _event(times.trained, "training", f"step {index} training started (attempt 1 of 3)", row_id),
    ]
    if attempts > 1:
        events.append(
            _event(
                times.trained + dt.timedelta(minutes=30),
                "requeued",
                f"step {index}: the daemon restarted during training; it resumes from its checkpoint",
                row_id,
                level="warning",
            )
        )
    events.append(
        _event(
            times.finished,
            "promoted",
            f"step {index}: {version} promoted (old-class mIoU within budget)",
            row_id,
        )
    )
    return events


def _add_rejection(rows: _Rows, ws: Workspace, index: int, at: dt.datetime) -> None:
    """A batch rejected for undeclared mask values, with its event."""
    bad = f"bad-{index:04d}"
    reasons = [f"masks/{i:04d}.png: value {7 + i} is not declared in batch.toml" for i in range(3)]
    rows.rejections.append(
        {
            "batch_name": bad,
            "sha256": None,
            "reasons": reasons,
            "path": str(ws.rejected / bad),
            "created_at": at,
        }
    )
    rows.events.append(
        _event(at, "rejected", f"batch {bad!r} rejected: {reasons[0]} (and 2 more)", None, level="warning")
    )


def _insert(rows: _Rows, url: str) -> float:
    """Bulk-insert ``rows`` into the catalog at ``url`` in one transaction; the seconds it took."""
    started = time.perf_counter()
    engine = connection.make_engine(url)
    try:
        with connection.transaction(connection.session_factory(engine)) as session:
            # Parents first: foreign keys are on, as in every catalog connection.
            for model, table_rows in (
                (Batch, rows.batches),
                (Step, rows.steps),
                (Class, rows.classes),
                (Job, rows.jobs),
                (ModelVersion, rows.versions),
                (Event, rows.events),
                (Rejection, rows.rejections),
            ):
                if table_rows:
                    session.execute(insert(model), table_rows)
    finally:
        engine.dispose()
    return time.perf_counter() - started


def _event(
    at: dt.datetime, kind: str, message: str, step_id: int | None, *, level: str = "info"
) -> dict[str, Any]:
    return {"at": at, "level": level, "kind": kind, "message": message, "step_id": step_id}


def make_status_workspace(root: Path, *, steps: int) -> tuple[Workspace, CatalogStats]:
    """A new workspace at ``root`` whose catalog holds ``steps`` promoted steps."""
    ws = new_workspace(root)
    return ws, build_catalog(ws, steps=steps)
