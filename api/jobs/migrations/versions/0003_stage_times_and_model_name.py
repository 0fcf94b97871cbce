"""Add the jobs' stage start times (the store's clock) and the uploaded model file's name.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add `jobs.stage_times` and `jobs.model_name`."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("stage_times", sa.JSON, nullable=True))
        batch.add_column(sa.Column("model_name", sa.String(255), nullable=True))


def downgrade() -> None:
    """Drop `jobs.model_name` and `jobs.stage_times`."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("model_name")
        batch.drop_column("stage_times")
