"""The long-lived objects one process needs, built from settings: store, files, queue, metrics.

Both the API (`api.main`) and a standalone worker (`compressor worker`) open one `Services`;
`api.workers.background.BackgroundWork` runs what a process does besides answering requests.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from api.jobs.database import JobDatabase
from api.jobs.folders import JobFolders
from api.jobs.queue import JobQueue
from api.metrics import Metrics
from api.settings import Settings


@dataclass
class Services:
    """Store, files, queue and metrics of one process."""

    settings: Settings
    store: JobDatabase
    files: JobFolders
    queue: JobQueue
    metrics: Metrics = field(default_factory=Metrics)

    @classmethod
    def open(cls, settings: Settings, metrics: Metrics | None = None) -> Services:
        """Connect to the store (migrating its schema to head), the queue and the data dir."""
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        store = JobDatabase(settings.resolved_store_url)
        files = JobFolders(settings.data_dir)
        queue = JobQueue(
            settings.resolved_queue_url, settings.queue_name, poll_s=settings.queue_poll_s
        )
        services = cls(settings, store, files, queue, metrics or Metrics())
        services.metrics.watch_backlog(
            store.count_by_status, queue.depth,
            lambda: len(store.live_workers(settings.lease_s)),
        )
        return services

    def close(self) -> None:
        """Close the store's and the queue's connections."""
        self.queue.close()
        self.store.close()
