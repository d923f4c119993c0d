"""Intake: a complete inbox folder becomes a recorded batch (and a queued step), or a rejection.

The path goes down the layers: the inbox says which folders are complete (``batch/inbox.py``), validation
says what is wrong (``batch/validation.py``), the inbox copies and archives, the catalog records
(``catalog/records.py``). The loop (``service/daemon.py``) calls :func:`scan_inbox` with what it holds.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import shutil
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

from sqlalchemy.orm import Session

from ciss_daemon.batch.inbox import (
    SUBMITTED_MARKER,
    CompletenessTracker,
    archive_folder,
    candidate_folders,
    reject_folder,
    store_folder,
)
from ciss_daemon.batch.listing import printable
from ciss_daemon.batch.validation import Problem, ValidatedBatch, validate_batch
from ciss_daemon.catalog import records as catalog
from ciss_daemon.settings import Settings
from ciss_daemon.workspace import Workspace

log = logging.getLogger("ciss.daemon")

Transaction = Callable[[], AbstractContextManager[Session]]  # a write transaction on the catalog


def scan_inbox(
    ws: Workspace,
    settings: Settings,
    transaction: Transaction,
    *,
    tracker: CompletenessTracker,
    pending: set[Path],
    now: dt.datetime,
) -> None:
    """Ingest every complete folder of the inbox; ``pending`` keeps those still settling (changed here)."""
    folders = candidate_folders(ws.inbox)
    pending.intersection_update(folders)
    tracker.prune(folders)  # folders that left the inbox before they settled
    for folder in folders:
        complete = (folder / SUBMITTED_MARKER).exists() or tracker.observe(folder, now)
        if not complete:
            pending.add(folder)
            continue
        pending.discard(folder)
        tracker.forget(folder)
        try:
            ingest(folder, ws, settings, transaction, now=now)
        except Exception:  # the folder stays in the inbox and is tried again at the next scan
            log.exception("could not ingest %s; it stays in the inbox", folder.name)


def ingest(
    folder: Path, ws: Workspace, settings: Settings, transaction: Transaction, *, now: dt.datetime
) -> None:
    """Validate a complete folder; accept it as a batch (and a step) or reject it with its reasons."""
    with transaction() as s:
        unavailable = catalog.unavailable_class_names(session=s)
        known = catalog.live_batch_hashes(session=s)
    # Every [limits] setting is a keyword of validate_batch of the same name.
    result = validate_batch(
        folder, taught_names=unavailable, known_hashes=known, **dataclasses.asdict(settings.limits)
    )
    if not result.ok or result.batch is None:
        reject(folder, result.problems, ws, transaction, now=now)
        return
    batch = result.batch
    # Copy, record, and only then move the original out of the inbox: a crash before the commit
    # leaves the original in the inbox (ingested again at the next start), never a batch that is
    # archived but not in the catalog.
    stored = store_folder(folder, store=ws.store, sha256=batch.sha256)
    (stored / SUBMITTED_MARKER).unlink(missing_ok=True)
    try:
        message = record_accepted(batch, stored, ws, settings, transaction, now=now)
    except BaseException:
        shutil.rmtree(stored, ignore_errors=True)  # our own copy; the original is still in the inbox
        raise
    archived = archive_folder(folder, archive=ws.archive, now=now)
    log.info("%s; original archived at %s", message, archived)


def record_accepted(
    batch: ValidatedBatch,
    stored: Path,
    ws: Workspace,
    settings: Settings,
    transaction: Transaction,
    *,
    now: dt.datetime,
) -> str:
    """Record a validated batch stored at ``stored`` (and its step and job); returns the event's words."""
    with transaction() as s:
        row = catalog.record_batch(
            session=s,
            name=batch.name,
            kind=batch.kind,
            sha256=batch.sha256,
            store_path=stored,
            class_names=batch.classes,
            n_train=len(batch.train_stems),
            n_val=len(batch.val_stems),
            now=now,
        )
        if batch.kind == "train":
            step = catalog.create_step(session=s, batch=row, now=now)
            catalog.create_job(
                session=s,
                step=step,
                max_attempts=settings.daemon.max_attempts,
                jobs_dir=ws.jobs,
                now=now,
            )
            names = ", ".join(batch.classes.values())
            message = f"batch {batch.name!r} accepted as step {step.index} ({names})"
        else:
            step = None
            message = f"evaluation batch {batch.name!r} accepted ({len(batch.train_stems)} images)"
        catalog.log_event(session=s, kind="accepted", message=message, step=step, now=now)
    return message


def reject(
    folder: Path, problems: list[Problem], ws: Workspace, transaction: Transaction, *, now: dt.datetime
) -> None:
    """Move the folder to ``rejected/`` with its REJECTED.txt, and record the rejection."""
    moved = reject_folder(folder, rejected=ws.rejected, problems=problems, now=now)
    reasons = [str(p) for p in problems]
    # A folder name may hold bytes that are not UTF-8 (surrogate escapes), which the catalog cannot
    # store: record and print it escaped, as REJECTED.txt does.
    name, report = printable(folder.name), printable(str(moved / "REJECTED.txt"))
    with transaction() as s:
        catalog.record_rejection(
            session=s, batch_name=name, reasons=reasons, path=printable(str(moved)), now=now
        )
        catalog.log_event(
            session=s,
            kind="rejected",
            level="warning",
            message=f"batch {name!r} rejected: {reasons[0]}"
            + (f" (and {len(reasons) - 1} more, see {report})" if len(reasons) > 1 else ""),
            now=now,
        )
    log.warning("batch %r rejected (%d problems): %s; see %s", name, len(reasons), reasons[0], report)
