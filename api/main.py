"""The FastAPI application: `create_app(settings)` wires routes, errors, metrics and background work.

At start the app opens its services (migrating the store's schema), starts the lease reaper and,
unless `embedded_worker` is off, a job consumer in `worker_concurrency` threads of this process.
At shutdown running jobs are asked to stop and go back to the queue.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

import compressor
from api.errors import install_error_handlers
from api.metrics import Metrics, RequestLatencyMiddleware
from api.routes import artifacts, events, health, jobs
from api.services import BackgroundWork, Services
from api.settings import Settings, get_settings
from api.worker import RunJob

log = logging.getLogger("api")


def create_app(settings: Settings | None = None, *, run_job: RunJob | None = None) -> FastAPI:
    """Return the service's ASGI app; `run_job` replaces `compressor.compress` (tests only)."""
    settings = settings or get_settings()
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        services = await run_in_threadpool(Services.open, settings, metrics)
        concurrency = settings.worker_concurrency if settings.embedded_worker else 0
        background = BackgroundWork(services, concurrency=concurrency, run_job=run_job)
        background.start()
        app.state.services = services
        log.info("service ready; embedded worker: %s job(s) at once", concurrency or "off")
        try:
            yield
        finally:
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
    for router in (jobs.router, artifacts.router, events.router, health.router):
        app.include_router(router)
    return app
