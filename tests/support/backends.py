"""The two backends every store/queue/storage test runs against, and their set-up and clean-up.

- embedded: SQLite job store and SQLite (Huey) queue under the test's data directory;
- distributed: PostgreSQL (a schema of its own per test) and Redis (a queue name of its own),
  from COMPRESSOR_TEST_POSTGRES_URL and COMPRESSOR_TEST_REDIS_URL.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

POSTGRES_URL = os.environ.get(
    "COMPRESSOR_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_URL = os.environ.get("COMPRESSOR_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@dataclass(frozen=True)
class Backend:
    """Where one test's job store, queue and files live."""

    name: str
    data_dir: Path
    store_url: str
    queue_url: str
    queue_name: str

    def env(self) -> dict[str, str]:
        """Return the COMPRESSOR_* variables that point a server process at this backend."""
        return {
            "COMPRESSOR_DATA_DIR": str(self.data_dir),
            "COMPRESSOR_STORE_URL": self.store_url,
            "COMPRESSOR_QUEUE_URL": self.queue_url,
            "COMPRESSOR_QUEUE_NAME": self.queue_name,
        }

    def settings_fields(self) -> dict[str, object]:
        """Return the Settings fields that select this backend."""
        return {
            "data_dir": self.data_dir, "store_url": self.store_url,
            "queue_url": self.queue_url, "queue_name": self.queue_name,
        }


@contextmanager
def embedded_backend(data_dir: Path) -> Iterator[Backend]:
    """Yield SQLite files under `data_dir` (removed with the temp dir)."""
    yield Backend(
        "embedded", data_dir, f"sqlite:///{data_dir / 'jobs.db'}",
        f"sqlite:///{data_dir / 'queue.db'}", "compressor",
    )


def _servers_or_skip() -> None:
    import psycopg
    import redis
    from sqlalchemy.engine import make_url

    pg = make_url(POSTGRES_URL).set(drivername="postgresql")
    try:
        psycopg.connect(pg.render_as_string(hide_password=False), connect_timeout=3).close()
    except Exception as exc:
        pytest.skip(f"PostgreSQL unreachable at {POSTGRES_URL} ({exc}); set "
                    "COMPRESSOR_TEST_POSTGRES_URL or start the server")
    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=3).ping()
    except Exception as exc:
        pytest.skip(f"Redis unreachable at {REDIS_URL} ({exc}); set COMPRESSOR_TEST_REDIS_URL "
                    "or start the server")


def _admin_sql(statement: str) -> None:
    import psycopg
    from sqlalchemy.engine import make_url

    pg = make_url(POSTGRES_URL).set(drivername="postgresql")
    with psycopg.connect(pg.render_as_string(hide_password=False), autocommit=True) as conn:
        conn.execute(statement)


@contextmanager
def distributed_backend(data_dir: Path) -> Iterator[Backend]:
    """Yield a fresh PostgreSQL schema and Redis queue name; drop both afterwards."""
    import redis
    from sqlalchemy.engine import make_url

    _servers_or_skip()
    unique = f"ctest_{uuid.uuid4().hex[:12]}"
    _admin_sql(f'CREATE SCHEMA "{unique}"')
    store_url = make_url(POSTGRES_URL).update_query_dict({"options": f"-csearch_path={unique}"})
    try:
        yield Backend(
            "distributed", data_dir, store_url.render_as_string(hide_password=False),
            REDIS_URL, unique,
        )
    finally:
        _admin_sql(f'DROP SCHEMA IF EXISTS "{unique}" CASCADE')
        client = redis.Redis.from_url(REDIS_URL)
        for key in client.scan_iter(match=f"huey.*.{unique}*"):
            client.delete(key)
