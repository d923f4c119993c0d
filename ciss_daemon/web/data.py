"""What the dashboard shows, read from the catalog (through ``ciss status``'s snapshot) and the job files.

The snapshot gains the current model's lineage and its mIoU in both groupings, the charts (``charts.py``,
the last steps only), the running job's fresh progress (``polling.py``), the rejected batches with every
reason, and the gate's settings; the step table still lists every step. Nothing here imports torch.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon import status
from ciss_daemon.catalog.connection import session_reader
from ciss_daemon.catalog.tables import Batch, Class, ModelVersion, Rejection, Step, StepState
from ciss_daemon.settings import Settings
from ciss_daemon.web.charts import ChartCache
from ciss_daemon.web.polling import revision, running_fields
from ciss_daemon.workspace import Workspace

LINEAGE_SHOWN = 20  # promoted steps listed in the current model's lineage, besides the base step
TABLE_STEPS = 100  # rows of the step table unless the page is asked for all (?steps=all)
REJECTIONS = 20


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


def dashboard(
    ws: Workspace, factory: sessionmaker[Session], settings: Settings, *, charts: ChartCache | None = None
) -> dict[str, Any]:
    """Everything the page shows; the snapshot of ``ciss status`` plus lineage, charts and full reasons."""
    with factory() as s:
        data = status.snapshot(ws, session_reader(s))
        data["revision"] = revision(s)
        if data["running"] is not None:
            r = data["running"]
            data["running"] = running_fields(
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
