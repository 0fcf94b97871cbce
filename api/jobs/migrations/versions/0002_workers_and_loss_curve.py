"""Add the workers table (heartbeats) and the jobs' recent fine-tuning loss points.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create `workers`; add `jobs.loss_curve`."""
    op.create_table(
        "workers",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("last_seen_at", sa.Float, nullable=False),
    )
    op.create_index("ix_workers_last_seen", "workers", ["last_seen_at"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("loss_curve", sa.JSON, nullable=True))


def downgrade() -> None:
    """Drop `jobs.loss_curve` and `workers`."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("loss_curve")
    op.drop_index("ix_workers_last_seen", table_name="workers")
    op.drop_table("workers")
