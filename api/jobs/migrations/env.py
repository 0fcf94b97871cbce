"""Alembic environment: migrate the connection handed over by `api.jobs.migrate`, or the ini's URL.

`api.jobs.migrate.upgrade_to_head` passes an open connection in `config.attributes["connection"]`
(inside a transaction that holds the migration lock). Run by hand, `alembic -c
api/jobs/migrations/alembic.ini upgrade head` uses `sqlalchemy.url` from the ini or the -x url=...
option.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from api.jobs.tables import metadata

config = context.config


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Migrate the given connection, or one opened from the configured URL."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = context.get_x_argument(as_dictionary=True).get("url") or config.get_main_option(
        "sqlalchemy.url"
    )
    with create_engine(url).begin() as connection:
        _run(connection)


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them against a database")
run_migrations_online()
