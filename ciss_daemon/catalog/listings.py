"""What ``ciss classes`` and ``ciss models`` list, read from the catalog's tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.tables import Class, ModelVersion, Step


def class_rows(factory: sessionmaker[Session]) -> list[dict[str, Any]]:
    """Every class: id, name, step index and state, taught."""
    with factory() as s:
        rows = s.execute(
            select(Class.id, Class.name, Class.taught, Step.index, Step.state)
            .outerjoin(Step, Class.step_id == Step.id)
            .order_by(Class.id)
        )
        return [
            {"id": cid, "name": name, "taught": taught, "step": index, "step_state": state}
            for cid, name, taught, index, state in rows
        ]


def model_rows(factory: sessionmaker[Session]) -> list[dict[str, Any]]:
    """Every model version, oldest first: step, state, when, mIoU in both groupings, current, rollback.

    ``rollback``: whether ``ciss rollback`` accepts it now (promoted, still in the history, older than
    the current model). mIoU ``old``/``new`` are the gate's grouping (old = every class before the
    model's step); ``paper`` the paper's (old = background and the base classes), when it was recorded.
    """
    with factory() as s:
        current = catalog.current_version(session=s)
        current_index = current.step.index if current is not None else -1
        rows = []
        for version, index, step_state in s.execute(
            select(ModelVersion, Step.index, Step.state)
            .join(Step, ModelVersion.step_id == Step.id)
            .order_by(ModelVersion.id)
        ):
            m = (version.metrics or {}).get("candidate") or {}
            paper = m.get("paper") or {}
            pruned = not Path(version.path).is_dir()
            rows.append(
                {
                    "version": version.version,
                    "step": index,
                    "state": version.state,
                    "current": version.is_current,
                    "pruned": pruned,
                    "rollback": not version.is_current
                    and not pruned
                    and version.promoted_at is not None
                    and step_state == "promoted"
                    and index < current_index,
                    "created_at": version.created_at.isoformat(),
                    "promoted_at": version.promoted_at.isoformat() if version.promoted_at else None,
                    "miou_all": m.get("miou_all"),
                    "miou_old": m.get("miou_old"),
                    "miou_new": m.get("miou_new"),
                    "paper_miou_old": paper.get("miou_old"),
                    "paper_miou_new": paper.get("miou_new"),
                }
            )
        return rows
