"""Catalog rows written through the catalog's functions for the catalog tests: batches, steps, trained and
promoted model versions at fixed times. Import as `from catalog_helpers import ...` (pytest puts
tests/helpers on sys.path).
"""

import datetime as dt
import hashlib
from pathlib import Path

from sqlalchemy.orm import Session

from ciss_daemon.catalog import records as cat
from ciss_daemon.catalog.tables import Batch, ModelVersion, Step

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
METRICS = {"miou_all": 0.6, "miou_old": 0.7, "miou_new": 0.5, "hiou": 0.58, "per_class": {"1": 0.7}}


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def add_batch(session: Session, name: str, classes: dict[int, str], kind: str = "train") -> Batch:
    return cat.record_batch(
        session=session,
        name=name,
        kind=kind,
        sha256=sha(name),
        store_path=f"store/{name}",
        class_names=classes,
        n_train=4,
        n_val=2,
        now=T0,
    )


def add_step(session: Session, name: str, classes: dict[int, str]) -> Step:
    return cat.create_step(session=session, batch=add_batch(session, name, classes), now=T0)


def train(session: Session, step: Step, tmp_path: Path) -> ModelVersion:
    """Queue, train and evaluate a step; returns its candidate model."""
    job = cat.create_job(session=session, step=step, max_attempts=3, jobs_dir=tmp_path / "jobs")
    cat.start_job(session=session, job=job, pid=4242)
    cat.set_step_state(session=session, step=step, state="evaluating")
    cat.finish_job(session=session, job=job, state="done")
    return cat.record_model_version(
        session=session,
        step=step,
        models_dir=tmp_path / "models",
        files={"model.safetensors": "ab" * 32},
        metrics={"candidate": METRICS, "current": None},
    )


def promoted(session: Session, step: Step, tmp_path: Path) -> ModelVersion:
    version = train(session, step, tmp_path)
    cat.promote_version(session=session, version=version)
    return version
