"""Prometheus metrics: jobs by status, queue depth, live workers, re-queued jobs, stage durations,
request latency.

Jobs by status, queue depth and live workers are read from the store and the queue at scrape
time, so every API replica reports the same numbers whichever process ran the jobs. Re-queued
jobs are counted by the process whose reaper or sweeper re-queued them. Stage durations and
finished-job counts are observed by the process that runs the job; the API reports those of its
embedded worker processes, and `compressor worker --metrics-port` those of its own. Each
`Metrics` has its own registry.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = logging.getLogger("api.metrics")

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_STAGE_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _BacklogCollector(Collector):
    """Report jobs by status and queue depth, read when scraped."""

    def __init__(
        self,
        count_by_status: Callable[[], dict[str, int]],
        queue_depth: Callable[[], int],
        live_workers: Callable[[], int],
    ) -> None:
        self._count_by_status = count_by_status
        self._queue_depth = queue_depth
        self._live_workers = live_workers

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """Yield the job counts by status, the queue depth and the live workers, read now."""
        jobs = GaugeMetricFamily("compressor_jobs", "Jobs in the store by status", labels=["status"])
        depth = GaugeMetricFamily("compressor_queue_depth", "Messages waiting in the queue")
        live = GaugeMetricFamily(
            "compressor_workers_live", "Job worker processes that sent a heartbeat within a lease"
        )
        try:
            for status, count in self._count_by_status().items():
                jobs.add_metric([status], count)
            depth.add_metric([], self._queue_depth())
            live.add_metric([], self._live_workers())
        except Exception:  # a scrape must not fail because the store blinked; /readyz says so
            log.exception("could not read the job counts for /metrics")
        yield jobs
        yield depth
        yield live


class Metrics:
    """The service's metrics, in a registry of their own.

    `runs_jobs`: this process runs jobs itself (stage durations and finished jobs are observed
    here); otherwise its job workers are child processes whose metrics `read_worker_metrics`
    adds.
    """

    def __init__(self, *, runs_jobs: bool = True) -> None:
        self.registry = CollectorRegistry()
        self.request_latency = Histogram(
            "compressor_http_request_duration_seconds",
            "Time to answer an HTTP request, by route template",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Counted only by processes that run the reaper and sweeper (never pooled children), so
        # the multiprocess collector never reports a second family of this name.
        self.jobs_requeued = Counter(
            "compressor_jobs_requeued",
            "Jobs put back on the queue: lease_expired (the reaper, a worker died mid-job) or "
            "lost_message (the sweeper, queued with no message)",
            ["reason"],
            registry=self.registry,
        )
        self.stage_duration: Histogram | None = None
        self.jobs_finished: Counter | None = None
        self.internal_errors: Counter | None = None
        if runs_jobs:
            self.stage_duration = Histogram(
                "compressor_job_stage_duration_seconds",
                "Time a job spent in each pipeline stage (observed by the process running it)",
                ["stage"],
                buckets=_STAGE_BUCKETS,
                registry=self.registry,
            )
            self.jobs_finished = Counter(
                "compressor_jobs_finished",
                "Jobs this process finished, by final status",
                ["status"],
                registry=self.registry,
            )
            self.internal_errors = Counter(
                "compressor_job_internal_errors",
                "Jobs this process failed with an internal error (a bug; details in job.log)",
                registry=self.registry,
            )

    def read_worker_metrics(self, directory: str) -> None:
        """Report the metrics the job worker processes write to `directory` (multiprocess mode)."""
        MultiProcessCollector(self.registry, path=directory)

    def watch_backlog(
        self,
        count_by_status: Callable[[], dict[str, int]],
        queue_depth: Callable[[], int],
        live_workers: Callable[[], int],
    ) -> None:
        """Report jobs by status, queue depth and live workers from these readers at scrapes."""
        self.registry.register(_BacklogCollector(count_by_status, queue_depth, live_workers))

    def count_requeued(self, reason: str) -> None:
        """Count a job put back on the queue by the reaper or the sweeper."""
        self.jobs_requeued.labels(reason).inc()

    def observe_stage(self, stage: str, seconds: float) -> None:
        """Record that a job spent `seconds` in `stage`."""
        if self.stage_duration is not None:
            self.stage_duration.labels(stage).observe(seconds)

    def count_finished(self, status: str) -> None:
        """Count a job this process finished."""
        if self.jobs_finished is not None:
            self.jobs_finished.labels(status).inc()

    def count_internal_error(self) -> None:
        """Count a job this process failed with an internal error."""
        if self.internal_errors is not None:
            self.internal_errors.inc()

    def render(self) -> bytes:
        """Return the metrics in Prometheus' text format."""
        return generate_latest(self.registry)


class RequestLatencyMiddleware:
    """Observe each HTTP request's latency, labelled by its route template (not the raw path)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_and_record(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_record)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.metrics.request_latency.labels(scope["method"], template, str(status)).observe(
                time.perf_counter() - started
            )
