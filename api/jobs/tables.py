"""The job store's table, as SQLAlchemy Core metadata (the schema itself is made by migrations).

Times are Unix seconds (float) so SQLite and PostgreSQL compare them the same way; they are read
from the database server's clock (`store_now`), never from the caller's, so machines with skewed
clocks agree on leases. `seq` orders
jobs by submission (newest first in listings, the opaque cursor encodes it); `id` is public.
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("id", sa.String(32), nullable=False, unique=True),
    sa.Column("owner", sa.String(64), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("stage", sa.String(16), nullable=True),
    sa.Column("progress", sa.Float, nullable=False, server_default="0"),
    sa.Column("config", sa.JSON, nullable=False),
    sa.Column("data_format", sa.String(16), nullable=True),
    sa.Column("error", sa.JSON, nullable=True),
    sa.Column("report", sa.JSON, nullable=True),
    sa.Column("artifacts", sa.JSON, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("started_at", sa.Float, nullable=True),
    sa.Column("finished_at", sa.Float, nullable=True),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("worker_id", sa.String(64), nullable=True),
    sa.Column("lease_expires_at", sa.Float, nullable=True),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("retry_reason", sa.Text, nullable=True),
    # Recent fine-tuning loss points [[step, loss], ...], thinned to at most LOSS_POINTS.
    sa.Column("loss_curve", sa.JSON, nullable=True),
    # When each stage of the current run started {stage: time}, on the store's clock.
    sa.Column("stage_times", sa.JSON, nullable=True),
    # The uploaded model file's name as the client sent it (shown to its owner, never a path).
    sa.Column("model_name", sa.String(255), nullable=True),
    # Where the current run resumed and what it reused from an earlier try's kept products.
    sa.Column("resumed", sa.Text, nullable=True),
    sa.Index("ix_jobs_owner_seq", "owner", "seq"),
    sa.Index("ix_jobs_status_lease", "status", "lease_expires_at"),
    sqlite_autoincrement=True,
)

# One row per live job worker process: it renews `last_seen_at` every heartbeat and deletes its
# row when it stops cleanly. A row not renewed within a lease is a dead (or hung) worker.
workers = sa.Table(
    "workers",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", sa.Float, nullable=False),
    sa.Column("last_seen_at", sa.Float, nullable=False),
    sa.Index("ix_workers_last_seen", "last_seen_at"),
)
