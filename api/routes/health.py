"""`/healthz` (the process answers), `/readyz` (store, queue and files reachable), `/metrics`."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import ServicesDep
from api.schemas import ReadyStatus

router = APIRouter(tags=["health"])


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
    """Answer 200 when the store, the queue and the data directory answer; 503 otherwise."""
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
    ready = all(v == "ok" for v in checks.values())
    body = ReadyStatus(status="ready" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def read_metrics(services: ServicesDep) -> Response:
    """Return the metrics in Prometheus' text format."""
    return Response(services.metrics.render(), media_type=CONTENT_TYPE_LATEST)
