"""The record functions, in one namespace: keyword-only functions over the tables of ``catalog/tables.py``.

Functions take an open ``session`` and never commit: the caller decides what one transaction holds,
usually with ``catalog.connection.transaction``. Callers import this module as ``catalog`` and write
``catalog.create_job(session=s, ...)``; the functions live by concept in ``batches.py`` (batches, their
classes, rejections), ``steps.py`` (the step lifecycle), ``jobs.py`` (training jobs), ``versions.py``
(model versions, promotion, rollback) and ``events.py`` (the event log).
"""

from ciss_daemon.catalog.batches import (
    add_classes,
    batch_value_map,
    class_map,
    live_batch_hashes,
    record_batch,
    record_rejection,
    unavailable_class_names,
)
from ciss_daemon.catalog.events import log_event
from ciss_daemon.catalog.jobs import create_job, finish_job, requeue_job, start_job, update_job_progress
from ciss_daemon.catalog.states import METRIC_KEYS, SETTLED_STATES
from ciss_daemon.catalog.steps import (
    RELEASED_STATES,
    STEP_TRANSITIONS,
    create_step,
    discard_step,
    next_runnable_step,
    set_step_state,
)
from ciss_daemon.catalog.tables import utcnow
from ciss_daemon.catalog.versions import (
    current_version,
    find_version,
    promote_version,
    record_model_version,
    rollback_to,
)

__all__ = [
    "METRIC_KEYS",
    "RELEASED_STATES",
    "SETTLED_STATES",
    "STEP_TRANSITIONS",
    "add_classes",
    "batch_value_map",
    "class_map",
    "create_job",
    "create_step",
    "current_version",
    "discard_step",
    "find_version",
    "finish_job",
    "live_batch_hashes",
    "log_event",
    "next_runnable_step",
    "promote_version",
    "record_batch",
    "record_model_version",
    "record_rejection",
    "requeue_job",
    "rollback_to",
    "set_step_state",
    "start_job",
    "unavailable_class_names",
    "update_job_progress",
    "utcnow",  # the catalog's clock, for callers that stamp rows themselves
]
