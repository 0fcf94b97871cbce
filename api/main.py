"""The FastAPI application: `create_app(settings)` wires routes, errors, metrics and background work.

At start the app opens its services (migrating the store's schema), starts the lease reaper and,
unless `embedded_worker` is off, `worker_concurrency` job worker processes. At shutdown running
jobs are asked to stop and go back to the queue.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

import compressor
from api.http.errors import install_error_handlers
from api.http.routes import artifacts, console, events, health, jobs
from api.metrics import Metrics, RequestLatencyMiddleware
from api.services import Services
from api.settings import Settings, get_settings
from api.workers.background import BackgroundWork
from api.workers.pool import WorkerPool
from api.workers.runner import RunJob

log = logging.getLogger("api")


def create_app(settings: Settings | None = None, *, run_job: RunJob | None = None) -> FastAPI:
    """Return the service's ASGI app.

    The embedded worker runs `worker_concurrency` job worker processes (see `api.workers.pool`).
    `run_job` replaces `compressor.compress` (tests only): a function cannot cross a process
    boundary, so the jobs then run in threads of this process instead.
    """
    settings = settings or get_settings()
    workers = settings.worker_concurrency if settings.embedded_worker else 0
    in_process = workers if run_job is not None else 0
    metrics = Metrics(runs_jobs=in_process > 0)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await run_in_threadpool(Services.open, settings, metrics)
        background = BackgroundWork(services, concurrency=in_process, run_job=run_job)
        pool = None
        if workers and not in_process:
            pool = WorkerPool(settings, workers, _log_level(), embedded=True)
        background.start()
        if pool is not None:
            metrics.read_worker_metrics(pool.metrics_dir)
            pool.start()
        app.state.services = services
        log.info("service ready; %s", f"{workers} job worker(s)" if workers else "no job worker")
        try:
            yield
        finally:
            if pool is not None:
                await run_in_threadpool(pool.stop)
            await run_in_threadpool(background.stop)
            services.close()

    app = FastAPI(
        title="compressor",
        version=compressor.__version__,
        summary="Compress PyTorch programs into low-rank or tied form and export verified ONNX.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    install_error_handlers(app)
    app.add_middleware(RequestLatencyMiddleware, metrics=metrics)
    for router in (jobs.router, artifacts.router, events.router, health.router, console.router):
        app.include_router(router)
    app.mount("/console", _ConsoleFiles(directory=console.CONSOLE_DIR), name="console")
    return app


class _ConsoleFiles(StaticFiles):
    """The console's scripts and styles, with the page's security headers."""

    async def get_response(self, path: str, scope):  # type: ignore[no-untyped-def]
        response = await super().get_response(path, scope)
        response.headers.update(console.SECURITY_HEADERS)
        return response


def _log_level() -> str:
    return logging.getLevelName(logging.getLogger("api").getEffectiveLevel()).lower()
