"""The dashboard's charts: mIoU per step, IoU per class per step (a heat map) and loss per epoch.

Charts cover the last :data:`CHART_STEPS` steps: each model version's metrics hold the IoU of every class
it knows, so reading all of them on a catalog of 1,000 steps would take seconds per page. A version's
metrics never change once recorded, so :class:`ChartCache` reads each one once and redraws only when the
catalog's revision changes. Values are rounded to what a chart can show.
"""

from __future__ import annotations

import threading
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from ciss_daemon.catalog.states import METRIC_KEYS
from ciss_daemon.catalog.tables import Class, ModelVersion, Step

CHART_STEPS = 30
HEATMAP_CLASSES = 60  # rows of the IoU heat map; past this, the classes that lost the most IoU
LOSS_ORDER = ("mbce", "kd", "dkd_pos", "dkd_neg", "ac", "total")

# A model version's candidate metrics and loss history, as drawn.
VersionMetrics = tuple[dict[str, Any] | None, list[dict[str, float]] | None]


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


def loss_order(terms: dict[str, Any]) -> list[str]:
    """Loss terms in the order of docs/method.md's weighted sum, then any others by name."""
    return [k for k in LOSS_ORDER if k in terms] + sorted(set(terms) - set(LOSS_ORDER))


def _charts(s: Session, steps: list[dict[str, Any]], known: dict[int, VersionMetrics]) -> dict[str, Any]:
    """mIoU per step, IoU per class per step (heat map) and loss per epoch, for the last CHART_STEPS.

    ``known`` holds the metrics of versions read before, by version id (a version's metrics never change
    once recorded); the versions of the window missing from it are read and added, the others dropped.
    """
    window = steps[-CHART_STEPS:]
    first = window[0]["index"] if window else 0
    latest = _latest_metrics(s, first, known)
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
    return {
        "steps": labels,
        "first_step": first,
        "miou": miou,
        "heatmap": _heatmap(s, iou_columns),
        "loss": {"labels": loss_labels, "terms": {k: losses[k] for k in loss_order(losses)}},
    }


def _latest_metrics(s: Session, first: int, known: dict[int, VersionMetrics]) -> dict[int, VersionMetrics]:
    """Step index -> the metrics of its last model version, for the steps from ``first`` on.

    Reads the versions missing from ``known`` into it and drops those no longer drawn.
    """
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
    return {index: known[version_id] for index, version_id in last_version.items()}


def _heatmap(s: Session, iou_columns: list[dict[str, float | None]]) -> dict[str, Any]:
    """The heat map of IoU per class (rows) per step (columns), at most HEATMAP_CLASSES rows."""
    ids = sorted(int(k) for k in set().union(*iou_columns))
    shown_note = ""
    if len(ids) > HEATMAP_CLASSES:
        ids = sorted(_most_forgotten(ids, iou_columns)[:HEATMAP_CLASSES])
        shown_note = f"the {HEATMAP_CLASSES} classes that lost the most IoU since their first score here"
    names = {cid: name for cid, name in s.execute(select(Class.id, Class.name).where(Class.id.in_(ids)))}
    # rows: classes, columns: steps of the window; None where a class was not scored
    heat = [[_round(iou.get(str(cid))) for iou in iou_columns] for cid in ids]
    return {"classes": [_name(names, cid) for cid in ids], "values": heat, "note": shown_note}


def _round(value: float | None) -> float | None:
    """Four significant digits: what a chart can show, in a page a quarter the size."""
    return None if value is None else float(f"{value:.4g}")


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
