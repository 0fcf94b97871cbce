"""What a process does besides answering requests: the lease reaper, the lost-message sweeper
and, when asked, a job consumer with its worker heartbeat.
"""

from __future__ import annotations

import logging
import threading

from api.services import Services
from api.workers.runner import JobRunner, RunJob
from compressor.vocabulary import QUEUED

log = logging.getLogger("api")

_FORGET_WORKERS_AFTER_S = 24 * 3600  # rows of workers silent this long are deleted


class BackgroundWork:
    """What a process does besides answering requests.

    - maintenance (unless `maintenance=False`): the lease reaper and the lost-message sweeper,
      every `reap_interval_s`;
    - with `concurrency > 0`: a consumer running jobs in `concurrency` threads, and a heartbeat
      that tells the store (and so `/readyz` and `/metrics` of every API replica) that this
      process is a live job worker.
    """

    def __init__(
        self,
        services: Services,
        *,
        concurrency: int,
        run_job: RunJob | None = None,
        maintenance: bool = True,
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
        self._threads = []
        if maintenance:
            self._threads.append(
                threading.Thread(target=self._maintain_forever, name="reaper", daemon=True)
            )
        if self._consumer is not None:
            self._threads.append(
                threading.Thread(target=self._beat_forever, name="worker-heartbeat", daemon=True)
            )

    def start(self) -> None:
        """Announce this worker (first heartbeat), start the threads and the consumer."""
        if self._consumer is not None:
            self._beat()
        for thread in self._threads:
            thread.start()
        if self._consumer is not None:
            self._consumer.start()

    def stop(self) -> None:
        """Stop taking jobs, ask running ones to stop (they are re-queued), and wait for them."""
        self._stop.set()
        self.runner.shutting_down.set()
        if self._consumer is not None:
            self._consumer.shutdown_timeout = self.services.settings.shutdown_timeout_s
            self._consumer.stop(graceful=True)
        for thread in self._threads:
            thread.join(timeout=5)
        if self._consumer is not None:
            try:
                self.services.store.remove_worker(self.runner.worker_id)
            except Exception:
                log.exception("could not remove this worker's heartbeat row; it goes stale")

    def reap_once(self) -> None:
        """Settle the running jobs whose lease expired (see `JobDatabase.reap_expired`)."""
        settings, store, queue = self.services.settings, self.services.store, self.services.queue
        for reaped in store.reap_expired(settings.max_attempts, queue.enqueue):
            log.warning("job %s: %s -> %s", reaped.id, reaped.reason, reaped.status)
            if reaped.status == QUEUED:
                self.services.metrics.count_requeued("lease_expired")
            else:  # over: what its tries kept for a retry goes
                self.services.files.delete_kept_products(reaped.id)

    def sweep_once(self) -> None:
        """Re-enqueue queued jobs that have no queue message (see `JobDatabase.requeue_lost`)."""
        settings, store, queue = self.services.settings, self.services.store, self.services.queue
        for job_id in store.requeue_lost(settings.requeue_after_s, queue.pending_ids, queue.enqueue):
            log.warning(
                "job %s: queued for over %g s with no message in the queue (its worker died "
                "before starting it); re-enqueued", job_id, settings.requeue_after_s,
            )
            self.services.metrics.count_requeued("lost_message")
        store.prune_workers(_FORGET_WORKERS_AFTER_S)

    def _maintain_forever(self) -> None:
        while True:
            for name, step in (("lease reaper", self.reap_once), ("sweeper", self.sweep_once)):
                try:
                    step()
                except Exception:
                    log.exception("the %s failed; retrying", name)
            if self._stop.wait(self.services.settings.reap_interval_s):
                return

    def _beat(self) -> None:
        try:
            self.services.store.beat_worker(self.runner.worker_id)
        except Exception:  # the store may blink; readiness reports the worker stale meanwhile
            log.exception("worker heartbeat failed")

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.services.settings.heartbeat_s):
            self._beat()
