"""The job queue: Huey on a SQLite file (default) or on Redis (`redis://` URL).

A message carries only a job id; the store is the truth about a job. A message for a job that
is no longer queued (cancelled, or already claimed through a duplicate message) is dropped by
the worker's claim, so delivering a message twice never runs a job twice.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from huey import RedisHuey, SqliteHuey
from huey.api import Huey
from huey.consumer import Consumer

log = logging.getLogger("api.queue")

TASK_NAME = "compressor.run_job"


def create_huey(url: str, name: str) -> Huey:
    """Return the Huey instance for `url`: sqlite:///path/queue.db or redis://host:port/db."""
    if url.startswith("sqlite:///"):
        path = Path(url.removeprefix("sqlite:///"))
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteHuey(name, filename=str(path), results=False, timeout=30)
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisHuey(name, url=url, results=False, blocking=True, read_timeout=1)
    raise ValueError(
        f"unsupported queue URL {url!r}: use sqlite:///path/to/queue.db (one machine) or "
        "redis://host:6379/0 (several machines); set it with COMPRESSOR_QUEUE_URL"
    )


class _Consumer(Consumer):
    """Huey's consumer without signal handlers: its host process decides how to stop."""

    def _set_signal_handlers(self) -> None:
        pass


class JobQueue:
    """Send job ids to workers and hand them to a handler in the consumer."""

    def __init__(self, url: str, name: str, *, poll_s: float = 0.25) -> None:
        self.url = url
        self.huey = create_huey(url, name)
        self._poll_s = poll_s
        self._handler: Callable[[str], None] | None = None
        self._task = self.huey.task(name=TASK_NAME)(self._dispatch)

    def _dispatch(self, job_id: str) -> None:
        if self._handler is None:
            log.error("job %s reached a process that runs no jobs; it stays queued", job_id)
            return
        self._handler(job_id)

    def enqueue(self, job_id: str) -> None:
        """Add a message asking a worker to run the job `job_id`."""
        self._task(job_id)

    def depth(self) -> int:
        """Return the number of messages waiting."""
        return int(self.huey.pending_count())

    def pending_ids(self) -> set[str]:
        """Return the job ids of the messages waiting in the queue (read now)."""
        ids = set()
        for task in self.huey.pending():
            if task.name == TASK_NAME and task.args:
                ids.add(str(task.args[0]))
        return ids

    def ping(self) -> None:
        """Raise if the queue cannot be reached."""
        self.huey.pending_count()

    def purge(self) -> None:
        """Drop every waiting message (tests and maintenance)."""
        self.huey.flush()

    def close(self) -> None:
        """Close the queue's connections."""
        self.huey.storage.close()

    def consumer(self, handler: Callable[[str], None], workers: int) -> Consumer:
        """Return a consumer (not started) that runs `handler(job_id)` in `workers` threads."""
        self._handler = handler
        options: dict[str, Any] = {
            "workers": workers, "periodic": False, "worker_type": "thread",
            "check_worker_health": False,
        }
        if not self.huey.storage.blocking:  # SQLite is polled: keep an idle worker responsive
            options.update(initial_delay=self._poll_s, backoff=1.0, max_delay=self._poll_s)
        return _Consumer(self.huey, **options)
