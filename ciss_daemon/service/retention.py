"""Disk retention: training checkpoints of finished jobs, and model folders no rollback can reach.

A checkpoint holds the model twice (weights and optimizer state: 122 MB for ResNet-18, 470 MB for
ResNet-101) and a model folder once. What the catalog still needs is never removed: the current model,
a candidate waiting for the gate or the operator, the models within the rollback depth, and the
checkpoints of running, queued (resumable) and held jobs.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from ciss_daemon.catalog import records as catalog
from ciss_daemon.catalog.tables import Job, JobState, ModelVersion, Step, StepState, VersionState
from ciss_daemon.exceptions import OperatorError

CHECKPOINT = "checkpoint.pt"
MIB = 1024**2


@dataclass(frozen=True)
class Freed:
    """What a pass removed: how many files or folders, and their bytes."""

    count: int
    nbytes: int

    def words(self, what: str) -> str:
        return f"{self.count} {what}{'s' if self.count != 1 else ''}, {self.nbytes / MIB:.0f} MiB freed"


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def prune_checkpoints(s: Session, *, keep: int) -> Freed:
    """Delete the checkpoints of finished jobs but the last ``keep`` ones and those of held steps."""
    finished = s.scalars(
        select(Job)
        .join(Step, Job.step_id == Step.id)
        .where(
            Job.state.in_((JobState.DONE, JobState.FAILED, JobState.CANCELLED)), Step.state != StepState.HELD
        )
        .order_by(Job.finished_at.desc(), Job.id.desc())
    ).all()
    count = nbytes = 0
    for job in finished[keep:]:
        path = Path(job.workdir, CHECKPOINT) if job.workdir else None
        if path is None or not path.is_file():
            continue
        size = path.stat().st_size
        path.unlink(missing_ok=True)
        count, nbytes = count + 1, nbytes + size
    return Freed(count, nbytes)


def rollback_targets(s: Session) -> list[ModelVersion]:
    """The models ``ciss rollback`` accepts, newest first: promoted once, still in the history, older than
    the current model."""
    current = catalog.current_version(session=s)
    if current is None:
        return []
    return list(
        s.scalars(
            select(ModelVersion)
            .join(Step, ModelVersion.step_id == Step.id)
            .where(
                ModelVersion.promoted_at.is_not(None),
                ~ModelVersion.is_current,
                Step.state == StepState.PROMOTED,
                Step.index < current.step.index,
            )
            .order_by(Step.index.desc())
        )
    )


def prune_models(s: Session, *, depth: int) -> tuple[Freed, list[str]]:
    """Delete model folders that are neither current, nor waiting for a decision, nor among the ``depth``
    newest rollback targets; returns what was freed and the versions removed. The catalog keeps their
    rows (metrics, history); ``ciss models`` shows them as pruned."""
    keep = {v.id for v in rollback_targets(s)[:depth]}
    count = nbytes = 0
    removed = []
    for version in s.scalars(select(ModelVersion).order_by(ModelVersion.id)):
        waiting = version.state == VersionState.CANDIDATE and version.step.state in (
            StepState.EVALUATING,
            StepState.HELD,
        )
        folder = Path(version.path)
        if version.is_current or waiting or version.id in keep or not folder.is_dir():
            continue
        size = _size(folder)
        shutil.rmtree(folder)
        count, nbytes = count + 1, nbytes + size
        removed.append(version.version)
    return Freed(count, nbytes), removed


def prune(s: Session, target: str | None) -> str:
    """``ciss prune [--depth N]``: remove the models beyond the rollback depth; what was freed, in words."""
    depth = int(target) if target and target.isdigit() else -1
    if depth < 0:
        raise OperatorError(f"--depth {target}: give the number of rollback targets to keep (0 or more)")
    freed, removed = prune_models(s, depth=depth)
    if not freed.count:
        return f"nothing to prune: every model folder is current, waiting, or within rollback depth {depth}"
    return f"pruned {freed.words('model')} ({', '.join(removed)}); `ciss models` lists what is left"
