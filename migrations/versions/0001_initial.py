"""Initial catalog schema: batches, classes, steps, jobs, model versions, rejections, events.

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Written out rather than imported from catalog/tables.py: a migration records the schema as it was then.
STEP_STATES = (
    "'accepted', 'queued', 'training', 'evaluating', 'promoted', 'held', 'failed', 'discarded', 'rolled_back'"
)


def _time(name: str, nullable: bool = False) -> sa.Column:
    return sa.Column(name, sa.DateTime(timezone=True), nullable=nullable)


def upgrade() -> None:
    op.create_table(
        "batches",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        _time("received_at"),
        sa.Column("store_path", sa.Text(), nullable=False),
        sa.Column("class_names", sa.JSON(), nullable=False),
        sa.Column("value_map", sa.JSON(), nullable=False),
        sa.Column("n_train", sa.Integer(), nullable=False),
        sa.Column("n_val", sa.Integer(), nullable=False),
        sa.CheckConstraint("kind IN ('train', 'eval')", name=op.f("ck_batches_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_batches")),
        sa.UniqueConstraint("sha256", name=op.f("uq_batches_sha256")),
    )
    op.create_index(op.f("ix_batches_name"), "batches", ["name"])

    op.create_table(
        "rejections",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("batch_name", sa.String(length=255), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("reasons", sa.JSON(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        _time("created_at"),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rejections")),
    )
    op.create_index(op.f("ix_rejections_created_at"), "rejections", ["created_at"])

    op.create_table(
        "steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
        _time("created_at"),
        _time("updated_at"),
        sa.CheckConstraint(f"state IN ({STEP_STATES})", name=op.f("ck_steps_state")),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_steps_batch_id_batches")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steps")),
        sa.UniqueConstraint("batch_id", name=op.f("uq_steps_batch_id")),
        sa.UniqueConstraint("index", name=op.f("uq_steps_index")),
    )
    op.create_index(op.f("ix_steps_state"), "steps", ["state"])

    op.create_table(
        "classes",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("name", sa.String(length=255), nullable=False),
        sa.Column("batch_id", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=True),
        sa.Column("taught", sa.Boolean(), nullable=False),
        _time("created_at"),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name=op.f("fk_classes_batch_id_batches")),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"], name=op.f("fk_classes_step_id_steps")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_classes")),
        sa.UniqueConstraint("name", name=op.f("uq_classes_name")),
    )
    op.create_index(op.f("ix_classes_batch_id"), "classes", ["batch_id"])
    op.create_index(op.f("ix_classes_step_id"), "classes", ["step_id"])

    op.create_table(
        "events",
        sa.Column("id", sa.Integer(), nullable=False),
        _time("at"),
        sa.Column("level", sa.String(length=16), nullable=False),
        sa.Column("kind", sa.String(length=64), nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=True),
        sa.CheckConstraint("level IN ('debug', 'info', 'warning', 'error')", name=op.f("ck_events_level")),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"], name=op.f("fk_events_step_id_steps")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_at"), "events", ["at"])
    op.create_index(op.f("ix_events_step_id"), "events", ["step_id"])

    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=True),
        sa.Column("progress", sa.JSON(), nullable=True),
        _time("created_at"),
        _time("started_at", nullable=True),
        _time("heartbeat_at", nullable=True),
        _time("finished_at", nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("workdir", sa.Text(), nullable=True),
        sa.CheckConstraint(
            "state IN ('queued', 'running', 'done', 'failed', 'cancelled')", name=op.f("ck_jobs_state")
        ),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"], name=op.f("fk_jobs_step_id_steps")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    op.create_index(op.f("ix_jobs_state"), "jobs", ["state"])
    op.create_index(op.f("ix_jobs_step_id"), "jobs", ["step_id"])

    op.create_table(
        "model_versions",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(length=32), nullable=False),
        sa.Column("step_id", sa.Integer(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("metrics", sa.JSON(), nullable=False),
        _time("created_at"),
        _time("promoted_at", nullable=True),
        sa.Column("is_current", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.CheckConstraint(
            "state IN ('candidate', 'promoted', 'discarded', 'retired')", name=op.f("ck_model_versions_state")
        ),
        sa.ForeignKeyConstraint(["step_id"], ["steps.id"], name=op.f("fk_model_versions_step_id_steps")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_versions")),
        sa.UniqueConstraint("version", name=op.f("uq_model_versions_version")),
    )
    op.create_index(op.f("ix_model_versions_is_current"), "model_versions", ["is_current"])
    op.create_index(op.f("ix_model_versions_step_id"), "model_versions", ["step_id"])


def downgrade() -> None:
    # Tables go in reverse order of their foreign keys; their indexes go with them.
    for table in ("model_versions", "jobs", "events", "classes", "steps", "rejections", "batches"):
        op.drop_table(table)
