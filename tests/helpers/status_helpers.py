"""A workspace's catalog filled with steps in chosen states, and the CLI runner the tests share."""

from __future__ import annotations

import datetime as dt
import hashlib
from typing import Any

from typer.testing import CliRunner

from ciss_daemon import status
from ciss_daemon.catalog import connection
from ciss_daemon.catalog import records as catalog
from ciss_daemon.settings import load_settings
from ciss_daemon.workspace import Workspace

runner = CliRunner()
# Noon on Friday 1 May 2026, UTC.
NOON = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)


def factory_of(ws: Workspace):  # type: ignore[no-untyped-def]
    return connection.session_factory(connection.make_engine(ws.catalog_url(load_settings(ws.settings_path))))


def snapshot_of(ws: Workspace, **options: Any) -> dict[str, Any]:
    """``status.snapshot`` of the workspace, read through a SQLAlchemy session as the dashboard reads it."""
    with connection.reading(factory_of(ws)) as read:
        return status.snapshot(ws, read, **options)


def add_steps(ws: Workspace, *states: str) -> None:
    """One step per state: 'promoted', 'held', 'queued' or 'requeued' (queued after a killed attempt)."""
    with connection.transaction(factory_of(ws)) as s:
        for index, state in enumerate(states):
            batch = catalog.record_batch(
                session=s,
                name=f"b{index}",
                kind="train",
                sha256=hashlib.sha256(str(index).encode()).hexdigest(),
                store_path=ws.store / f"b{index}",
                class_names={1: f"class-{index}"},
                n_train=2,
                n_val=0,
                now=NOON,
            )
            step = catalog.create_step(session=s, batch=batch, now=NOON)
            job = catalog.create_job(session=s, step=step, max_attempts=3, jobs_dir=ws.jobs, now=NOON)
            if state == "queued":
                continue
            catalog.start_job(session=s, job=job, pid=1, now=NOON)
            if state == "requeued":
                catalog.requeue_job(
                    session=s, job=job, error="the training process was killed by SIGKILL", now=NOON
                )
                continue
            catalog.set_step_state(session=s, step=step, state="evaluating", now=NOON)
            catalog.finish_job(session=s, job=job, state="done", now=NOON)
            version = catalog.record_model_version(
                session=s, step=step, models_dir=ws.models, files={}, metrics={}, now=NOON
            )
            if state == "promoted":
                catalog.promote_version(session=s, version=version, now=NOON)
            else:
                catalog.set_step_state(session=s, step=step, state="held", reason="below the floor", now=NOON)
