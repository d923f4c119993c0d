"""The catalog's vocabulary: schema head, states of steps, jobs and versions, the headline metric keys.

Plain Python, without SQLAlchemy, so that ``ciss status`` can read the catalog with plain SQL and start in
a fraction of a second; ``catalog/tables.py`` builds its constraints from the same values.
"""

from __future__ import annotations

from enum import StrEnum

# The revision `migrations/versions` ends at. Kept here so that readers (`ciss status`) can check the
# catalog without importing alembic; a test pins it to the migrations' head.
SCHEMA_HEAD = "0003"


class StepState(StrEnum):
    """Where a step is in its lifecycle (docs/product.md, "A step's life")."""

    ACCEPTED = "accepted"
    QUEUED = "queued"
    TRAINING = "training"
    EVALUATING = "evaluating"
    PROMOTED = "promoted"
    HELD = "held"
    FAILED = "failed"
    DISCARDED = "discarded"
    ROLLED_BACK = "rolled_back"


class JobState(StrEnum):
    """A training job: one step's training, over one or more attempts."""

    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


class VersionState(StrEnum):
    """A model version: a candidate until the gate or the operator decides."""

    CANDIDATE = "candidate"
    PROMOTED = "promoted"
    DISCARDED = "discarded"
    RETIRED = "retired"


STEP_STATES = tuple(StepState)
JOB_STATES = tuple(JobState)
VERSION_STATES = tuple(VersionState)
# Steps in these states no longer hold back later steps, and their classes may be taught again.
SETTLED_STATES = (StepState.PROMOTED, StepState.FAILED, StepState.DISCARDED, StepState.ROLLED_BACK)
# The summary numbers of a model version, in the gate's grouping (old = every class before its step).
METRIC_KEYS = ("miou_all", "miou_old", "miou_new", "hiou")
