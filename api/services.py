"""The long-lived objects one process needs, built from settings: store, files, queue, metrics.

Both the API (`api.main`) and a standalone worker (`compressor worker`) open one `Services`;
`BackgroundWork` runs what a process does besides answering requests: the lease reaper and,
when asked, a job consumer.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from api.metrics import Metrics
from api.queue import JobQueue
from api.settings import Settings
from api.storage import JobFiles
from api.store import JobStore
from api.worker import JobRunner, RunJob

log = logging.getLogger("api")


@dataclass
class Services:
    """Store, files, queue and metrics of one process."""

    settings: Settings
    store: JobStore
    files: JobFiles
    queue: JobQueue
    metrics: Metrics = field(default_factory=Metrics)

    @classmethod
    def open(cls, settings: Settings, metrics: Metrics | None = None) -> Services:
        """Connect to the store (migrating its schema to head), the queue and the data dir."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = JobStore(settings.resolved_store_url)
        files = JobFiles(settings.data_dir)
        queue = JobQueue(
            settings.resolved_queue_url, settings.queue_name, poll_s=settings.queue_poll_s
        )
        services = cls(settings, store, files, queue, metrics or Metrics())
        services.metrics.watch_backlog(store.count_by_status, queue.depth)
        return services

    def close(self) -> None:
        """Close the store's and the queue's connections."""
        self.queue.close()
        self.store.close()


class BackgroundWork:
    """The reaper thread and (optionally) a consumer running jobs in `concurrency` threads."""

    def __init__(
        self, services: Services, *, concurrency: int, run_job: RunJob | None = None
    ) -> None:
        self.services = services
        self.runner = JobRunner(
            services.settings, services.store, services.files, services.metrics,
            requeue=services.queue.enqueue, run_job=run_job,
        )
        self._consumer = (
            services.queue.consumer(self.runner.run, concurrency) if concurrency > 0 else None
        )
        self._stop = threading.Event()
        self._reaper = threading.Thread(target=self._reap_forever, name="reaper", daemon=True)

    def start(self) -> None:
        """Start the reaper and the consumer."""
        self._reaper.start()
        if self._consumer is not None:
            self._consumer.start()

    def stop(self) -> None:
        """Stop taking jobs, ask running ones to stop (they are re-queued), and wait for them."""
        self._stop.set()
        self.runner.shutting_down.set()
        if self._consumer is not None:
            self._consumer.shutdown_timeout = self.services.settings.shutdown_timeout_s
            self._consumer.stop(graceful=True)
        self._reaper.join(timeout=5)

    def reap_once(self) -> None:
        """Settle the running jobs whose lease expired (see `JobStore.reap_expired`)."""
        settings, store, queue = self.services.settings, self.services.store, self.services.queue
        for reaped in store.reap_expired(settings.max_attempts, queue.enqueue):
            log.warning("job %s: %s -> %s", reaped.id, reaped.reason, reaped.status)

    def _reap_forever(self) -> None:
        while True:
            try:
                self.reap_once()
            except Exception:
                log.exception("the lease reaper failed; retrying")
            if self._stop.wait(self.services.settings.reap_interval_s):
                return
