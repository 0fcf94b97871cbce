"""`/healthz` (the process answers), `/readyz` (store, queue, files, a live worker), `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api.http.deps import ServicesDep
from api.http.schemas import ReadyStatus

router = APIRouter(tags=["health"])

_NO_WORKER = (
    "no live job worker: none sent a heartbeat in the last {lease:g} s, so jobs would wait "
    "forever. Start `compressor worker` processes (or `compressor serve` with its embedded "
    "worker), or set COMPRESSOR_READY_REQUIRES_WORKER=false on an API-only replica"
)


@router.get("/healthz", summary="Liveness")
def read_health() -> dict[str, str]:
    """Answer 200 while the process serves requests."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=ReadyStatus,
    responses={503: {"model": ReadyStatus, "description": "a dependency is unreachable"}},
    summary="Readiness",
)
def read_readiness(services: ServicesDep) -> Response:
    """Answer 200 when the store, the queue and the data directory answer and a job worker is
    alive (it sent a heartbeat within a lease); 503 otherwise, naming what is wrong."""
    checks = {}
    for name, ping in (
        ("store", services.store.ping),
        ("queue", services.queue.ping),
        ("files", services.files.ping),
    ):
        try:
            ping()
            checks[name] = "ok"
        except Exception as exc:  # noqa: BLE001 (any failure means not ready; it is reported)
            checks[name] = f"{type(exc).__name__}: {exc}"
    settings = services.settings
    live: int | None = None
    if checks["store"] == "ok":
        try:
            live = len(services.store.live_workers(settings.lease_s))
        except Exception as exc:  # noqa: BLE001
            checks["store"] = f"{type(exc).__name__}: {exc}"
    if settings.ready_requires_worker:
        checks["workers"] = "ok" if live else _NO_WORKER.format(lease=settings.lease_s)
    ready = all(v == "ok" for v in checks.values())
    body = ReadyStatus(
        status="ready" if ready else "unavailable", checks=checks, live_workers=live
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def read_metrics(services: ServicesDep) -> Response:
    """Return the metrics in Prometheus' text format."""
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
