"""Let the same batch content be accepted again after its step failed, was discarded or rolled back.

``batches.sha256`` was unique, so a batch whose step failed (e.g. on a full disk) could never be submitted
again unchanged. The daemon now refuses a hash only while a batch holding it is live (an evaluation set,
or a step that is not failed, discarded or rolled back); the column keeps a plain index for that lookup.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.drop_constraint(op.f("uq_batches_sha256"), type_="unique")
        batch.create_index(op.f("ix_batches_sha256"), ["sha256"])


def downgrade() -> None:
    # Fails, leaving the catalog as it was, if a hash was accepted twice: remove one of those batches first.
    with op.batch_alter_table("batches") as batch:
        batch.drop_index(op.f("ix_batches_sha256"))
        batch.create_unique_constraint(op.f("uq_batches_sha256"), ["sha256"])
