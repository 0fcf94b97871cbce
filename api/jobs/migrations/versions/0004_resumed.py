"""Add where a job's latest run resumed and what it reused from an earlier try's kept products.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add `jobs.resumed`."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("resumed", sa.Text, nullable=True))


def downgrade() -> None:
    """Drop `jobs.resumed`."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("resumed")
