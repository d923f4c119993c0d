"""Index model_versions.state: `ciss status` looks up candidates by state on every call.

Without it SQLite scans every model version, reading past each row's metrics JSON (measured: 23 ms of a
39 ms status snapshot with 1,000 steps; under 0.1 ms with the index).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(op.f("ix_model_versions_state"), "model_versions", ["state"])


def downgrade() -> None:
    op.drop_index(op.f("ix_model_versions_state"), table_name="model_versions")
