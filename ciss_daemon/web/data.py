"""What the dashboard shows, read from the catalog (through ``ciss status``'s snapshot) and the job files.

Charts cover the last :data:`CHART_STEPS` steps: each model version's metrics hold the IoU of every class
it knows, so reading all of them on a catalog of 1,000 steps would take seconds per page; the step table
still lists every step. Nothing here imports torch.
"""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon import status, views
from ciss_daemon.catalog.connection import session_reader
from ciss_daemon.catalog.states import METRIC_KEYS
from ciss_daemon.catalog.tables import (
    Batch,
    Class,
    Event,
    Job,
    JobState,
    ModelVersion,
    Rejection,
    Step,
    StepState,
)
from ciss_daemon.service.jobs import read_json
from ciss_daemon.service.worker import PROGRESS
from ciss_daemon.settings import Settings
from ciss_daemon.workspace import Workspace, daemon_alive

CHART_STEPS = 30
LINEAGE_SHOWN = 20  # promoted steps listed in the current model's lineage, besides the base step
TABLE_STEPS = 100  # rows of the step table unless the page is asked for all (?steps=all)
HEATMAP_CLASSES = 60  # rows of the IoU heat map; past this, the classes that lost the most IoU
REJECTIONS = 20
LOSS_ORDER = ("mbce", "kd", "dkd_pos", "dkd_neg", "ac", "total")


def _job_progress(ws: Workspace, job_id: int, stored: dict[str, Any]) -> dict[str, Any]:
    """The worker's own progress.json (rewritten every second), else what the daemon copied (every 2 s)."""
    fresh = read_json(ws.jobs / str(job_id) / PROGRESS)
    return fresh if fresh is not None else stored


def revision(s: Session) -> str:
    """Changes whenever the daemon records something: the page re-renders when it differs."""
    last_event = s.scalar(select(func.max(Event.id))) or 0
    last_change = s.scalar(select(func.max(Step.updated_at)))
    return f"{last_event}:{last_change.isoformat() if last_change else '-'}"


def running(ws: Workspace, s: Session) -> dict[str, Any] | None:
    """The running job, its progress read from its job folder; None when nothing trains."""
    row = s.execute(
        select(Job, Step.index, Batch.name)
        .join(Step, Job.step_id == Step.id)
        .join(Batch, Step.batch_id == Batch.id)
        .where(Job.state == JobState.RUNNING)
        .order_by(Job.id)
        .limit(1)
    ).first()
    if row is None:
        return None
    job, index, batch = row
    return _running_fields(ws, job.id, index, batch, job.attempts, job.max_attempts, job.progress or {})


def _running_fields(
    ws: Workspace,
    job_id: int,
    step: int,
    batch: str,
    attempts: int,
    max_attempts: int,
    stored: dict[str, Any],
) -> dict[str, Any]:
    progress = _job_progress(ws, job_id, stored)
    done, total = progress.get("iteration"), progress.get("total")
    losses = progress.get("losses") or {}
    return {
        "job": job_id,
        "step": step,
        "batch": batch,
        "attempts": attempts,
        "max_attempts": max_attempts,
        "phase": progress.get("phase", "starting"),
        "iteration": done,
        "total": total,
        "fraction": done / total if done is not None and total else None,
        "epoch": None if progress.get("epoch") is None else progress["epoch"] + 1,
        "epochs": progress.get("epochs"),
        "losses": {k: losses[k] for k in _loss_order(losses)},
        "images_per_second": progress.get("images_per_second"),
        "eta_seconds": progress.get("eta_seconds"),
        "eta": views.duration(progress.get("eta_seconds")),
    }


def live(ws: Workspace, factory: sessionmaker[Session]) -> dict[str, Any]:
    """What the page polls every second: the running job, the daemon, and the catalog's revision."""
    with factory() as s:
        return {
            "daemon": daemon_alive(ws.lock_path),
            "running": running(ws, s),
            "revision": revision(s),
        }


def _nanmean(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    return sum(kept) / len(kept) if kept else None


def _hiou(old: float | None, new: float | None) -> float | None:
    if old is None or new is None or old + new == 0:
        return None if old is None or new is None else 0.0
    return 2 * old * new / (old + new)


def paper_grouping(iou: dict[str, float | None], base_ids: set[int]) -> dict[str, float | None]:
    """mIoU in docs/method.md's grouping: old = background and the base classes, new = every later class."""
    old = [v for k, v in iou.items() if int(k) == 0 or int(k) in base_ids]
    new = [v for k, v in iou.items() if int(k) != 0 and int(k) not in base_ids]
    miou_old, miou_new = _nanmean(old), _nanmean(new)
    return {
        "miou_all": _nanmean(list(iou.values())),
        "miou_old": miou_old,
        "miou_new": miou_new,
        "hiou": _hiou(miou_old, miou_new),
    }


def _lineage(s: Session, current_step: int) -> tuple[list[dict[str, Any]], int]:
    """The base step and the last LINEAGE_SHOWN promoted steps up to the current model's (each with its
    model version, batch and classes), oldest first, and how many promoted steps there are in all."""
    query = (
        select(Step.index, ModelVersion.version, Batch.name, Batch.class_names)
        .join(ModelVersion, ModelVersion.step_id == Step.id)
        .join(Batch, Step.batch_id == Batch.id)
        # a promoted step has one version that was promoted (retired since, or current)
        .where(
            Step.state == StepState.PROMOTED,
            Step.index <= current_step,
            ModelVersion.promoted_at.is_not(None),
        )
    )
    total = s.scalar(select(func.count()).select_from(query.subquery())) or 0
    rows = [
        *s.execute(query.order_by(Step.index).limit(1)),
        *reversed(s.execute(query.order_by(Step.index.desc()).limit(LINEAGE_SHOWN)).all()),
    ]
    by_step: dict[int, dict[str, Any]] = {}
    for index, version, batch, names in rows:
        classes = [n for _, n in sorted(names.items(), key=lambda item: int(item[0]))]
        by_step[index] = {"step": index, "version": version, "batch": batch, "classes": classes}
    return list(by_step.values()), total


# A model version's candidate metrics and loss history, as drawn.
VersionMetrics = tuple[dict[str, Any] | None, list[dict[str, float]] | None]


def _charts(s: Session, steps: list[dict[str, Any]], known: dict[int, VersionMetrics]) -> dict[str, Any]:
    """mIoU per step, IoU per class per step (heat map) and loss per epoch, for the last CHART_STEPS.

    ``known`` holds the metrics of versions read before, by version id (a version's metrics never change
    once recorded); the versions of the window missing from it are read and added, the others dropped.
    """
    window = steps[-CHART_STEPS:]
    first = window[0]["index"] if window else 0
    last_version: dict[int, int] = {}  # step index -> its last version's id (a retried step may have several)
    for index, version_id in s.execute(
        select(Step.index, ModelVersion.id)
        .join(Step, ModelVersion.step_id == Step.id)
        .where(Step.index >= first)
        .order_by(ModelVersion.id)
    ):
        last_version[index] = version_id
    missing = set(last_version.values()) - set(known)
    if missing:
        # Only the parts drawn: a version's metrics also hold the IoU of every class for the model it was
        # compared with, as large again and not needed here.
        for version_id, candidate, history in s.execute(
            select(ModelVersion.id, ModelVersion.metrics["candidate"], ModelVersion.metrics["history"]).where(
                ModelVersion.id.in_(missing)
            )
        ):
            known[version_id] = (candidate, history)
    for stale in set(known) - set(last_version.values()):
        del known[stale]
    latest = {index: known[version_id] for index, version_id in last_version.items()}
    labels: list[str] = []
    miou: dict[str, list[float | None]] = {key: [] for key in METRIC_KEYS}
    losses: dict[str, list[float | None]] = {}  # loss term -> value per (step, epoch) of loss_labels
    loss_labels: list[str] = []
    iou_columns: list[dict[str, float | None]] = []
    for st in window:
        candidate, history = latest.get(st["index"], (None, None))
        candidate = candidate or {}
        labels.append(f"step {st['index']}")
        for key in miou:
            miou[key].append(_round(candidate.get(key)))
        iou_columns.append(candidate.get("iou") or {})
        for epoch, terms in enumerate(history or [], start=1):
            loss_labels.append(f"s{st['index']} e{epoch}")
            for key, value in terms.items():
                losses.setdefault(key, [None] * (len(loss_labels) - 1)).append(_round(value))
            for values in losses.values():
                if len(values) < len(loss_labels):
                    values.append(None)
    ids = sorted(int(k) for k in set().union(*iou_columns))
    shown_note = ""
    if len(ids) > HEATMAP_CLASSES:
        ids = sorted(_most_forgotten(ids, iou_columns)[:HEATMAP_CLASSES])
        shown_note = f"the {HEATMAP_CLASSES} classes that lost the most IoU since their first score here"
    names = {cid: name for cid, name in s.execute(select(Class.id, Class.name).where(Class.id.in_(ids)))}
    # rows: classes, columns: steps of the window; None where a class was not scored
    heat = [[_round(iou.get(str(cid))) for iou in iou_columns] for cid in ids]
    ordered = _loss_order(losses)
    return {
        "steps": labels,
        "first_step": first,
        "miou": miou,
        "heatmap": {"classes": [_name(names, cid) for cid in ids], "values": heat, "note": shown_note},
        "loss": {"labels": loss_labels, "terms": {k: losses[k] for k in ordered}},
    }


def _round(value: float | None) -> float | None:
    """Four significant digits: what a chart can show, in a page a quarter the size."""
    return None if value is None else float(f"{value:.4g}")


def _loss_order(terms: dict[str, Any]) -> list[str]:
    """Loss terms in the order of docs/method.md's weighted sum, then any others by name."""
    return [k for k in LOSS_ORDER if k in terms] + sorted(set(terms) - set(LOSS_ORDER))


def _most_forgotten(ids: list[int], columns: list[dict[str, float | None]]) -> list[int]:
    """Class ids by how much IoU they lost from their first score in the window to their last, most first."""
    # dict.update runs in C, not a Python loop over every cell: 30 columns of 3,000 classes on a
    # long-lived catalog. A class unscored (None) at either end counts as no loss.
    first: dict[str, float | None] = {}
    last: dict[str, float | None] = {}
    for column in reversed(columns):
        first.update(column)
    for column in columns:
        last.update(column)

    def change(cid: int) -> float:
        start, end = first.get(str(cid)), last.get(str(cid))
        return 0.0 if start is None or end is None else end - start

    return sorted(ids, key=lambda cid: (change(cid), cid))


def _name(names: dict[int, str], cid: int) -> str:
    return "background" if cid == 0 else names.get(cid, f"class {cid}")


class ChartCache:
    """The chart data of the last revision, and the metrics of the model versions it drew.

    Reading the metrics of 30 model versions, each with the IoU of every class, is most of a page's cost on
    a long history. A version's metrics never change once recorded, so each is read once; the chart data
    itself changes only when the daemon records something, which changes the revision.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.revision: str | None = None
        self.data: dict[str, Any] | None = None
        self.versions: dict[int, VersionMetrics] = {}

    def get(self, s: Session, steps: list[dict[str, Any]], at_revision: str) -> dict[str, Any]:
        with self.lock:
            if self.data is None or self.revision != at_revision:
                self.data, self.revision = _charts(s, steps, self.versions), at_revision
            return self.data


def dashboard(
    ws: Workspace, factory: sessionmaker[Session], settings: Settings, *, charts: ChartCache | None = None
) -> dict[str, Any]:
    """Everything the page shows; the snapshot of ``ciss status`` plus lineage, charts and full reasons."""
    with factory() as s:
        data = status.snapshot(ws, session_reader(s))
        data["revision"] = revision(s)
        if data["running"] is not None:
            r = data["running"]
            data["running"] = _running_fields(
                ws, r["job"], r["step"], r["batch"], r["attempts"], r["max_attempts"], r["progress"]
            )
        current = data["current"]
        if current is not None:
            lineage, current["lineage_total"] = _lineage(s, current["step"])
            current["lineage"] = lineage
            current["batch"] = lineage[-1]["batch"] if lineage else None
            current["teacher"] = lineage[-2]["version"] if len(lineage) > 1 else None
            candidate = s.scalar(
                select(ModelVersion.metrics["candidate"]).where(ModelVersion.version == current["version"])
            )
            candidate = candidate or {}
            if candidate.get("paper"):  # recorded by the engine since it reports both groupings
                current["paper"] = {"miou_all": candidate.get("miou_all"), **candidate["paper"]}
            else:  # a model evaluated before: computed from its IoU per class
                base_names = set(lineage[0]["classes"]) if lineage else set()
                base = set(s.scalars(select(Class.id).where(Class.name.in_(base_names))))
                current["paper"] = paper_grouping(candidate.get("iou") or {}, base)
        data["charts"] = (charts or ChartCache()).get(s, data["steps"], data["revision"])
        data["rejections"] = [
            {
                "batch": r.batch_name,
                "at": r.created_at.isoformat(),
                "reasons": list(r.reasons),
                "path": r.path,
            }
            for r in s.scalars(
                select(Rejection).order_by(Rejection.created_at.desc(), Rejection.id.desc()).limit(REJECTIONS)
            )
        ]
        data["rejections_total"] = s.scalar(select(func.count(Rejection.id))) or 0
    held = {c["step"]: c for c in data["candidates"]}
    for st in data["steps"]:
        if st["state"] == "held" and st["index"] in held:
            st["gate"] = held[st["index"]]
    data["gate"] = {
        "old_miou_budget": settings.gate.old_miou_budget,
        "new_miou_floor": settings.gate.new_miou_floor,
        "auto_promote": settings.gate.auto_promote,
    }
    data["promoted_versions"] = _rollback_targets(data)
    return data


def _rollback_targets(data: dict[str, Any]) -> list[str]:
    """Versions of the current lineage older than the current model: what ``ciss rollback`` accepts."""
    current = data["current"]
    if current is None:
        return []
    return [entry["version"] for entry in current["lineage"] if entry["version"] != current["version"]]


def shown_steps(steps: list[dict[str, Any]], *, all_steps: bool) -> list[dict[str, Any]]:
    """The step table's rows, newest first: the last TABLE_STEPS, and any older step still held."""
    if all_steps or len(steps) <= TABLE_STEPS:
        return steps[::-1]
    recent = steps[-TABLE_STEPS:]
    older_held = [st for st in steps[:-TABLE_STEPS] if st["state"] == "held"]
    return [*recent[::-1], *older_held[::-1]]


def sample_files(root: Path, version: str | None) -> list[dict[str, str]]:
    """The sample predictions written for ``version`` (see ``samples.py``): one dict of file names each."""
    if version is None:
        return []
    folder = root / version
    rows = []
    for image in sorted(folder.glob("*.image.png")):
        stem = image.name.removesuffix(".image.png")
        if (folder / f"{stem}.truth.png").is_file() and (folder / f"{stem}.prediction.png").is_file():
            rows.append(
                {
                    "image": f"{version}/{stem}.image.png",
                    "truth": f"{version}/{stem}.truth.png",
                    "prediction": f"{version}/{stem}.prediction.png",
                }
            )
    return rows
