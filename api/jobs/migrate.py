"""Bring the job store's schema to the newest Alembic revision, safely from many processes.

Every process (API replicas, workers) calls `upgrade_to_head` at start. On PostgreSQL a
transaction-level advisory lock serializes them; on SQLite the write transaction (BEGIN
IMMEDIATE) does. The second process then finds the schema at head and does nothing.
"""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_PG_LOCK_KEY = 0x636F6D70  # "comp": one lock id for this schema's migrations


def alembic_config() -> Config:
    """Return an Alembic config pointing at `api/jobs/migrations`, independent of the working dir."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def upgrade_to_head(writer: sa.Engine) -> None:
    """Apply every migration not yet applied, holding the migration lock.

    `writer` must open write transactions (on SQLite: BEGIN IMMEDIATE).
    """
    config = alembic_config()
    with writer.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
