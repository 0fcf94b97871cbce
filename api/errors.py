"""The one place that turns errors into HTTP answers: `{"error": {"code", "message"}}`.

Routes raise `ApiError` (or let a core `CompressorError` through); the handlers installed by
`install_error_handlers` answer with a fitting 4xx and a message the caller can act on. Bad input
never becomes a 500; only a bug does, and it is logged with its traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from compressor.errors import CompressorError

log = logging.getLogger("api")

# HTTP status for each core error code, should one reach a request (only invalid_config does:
# the rest happen in workers and land in the job's `error`).
STATUS_BY_CORE_CODE = {
    "invalid_config": 422,
    "invalid_model": 422,
    "unsafe_model": 422,
    "invalid_data": 422,
    "unsupported_model": 422,
    "guard_failed": 422,
    "internal_error": 500,
    "export_failed": 500,
    "verification_failed": 500,
    "cancelled": 409,
    "timeout": 504,
}

_CODE_BY_HTTP_STATUS = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    416: "range_not_satisfiable",
    422: "invalid_request",
    429: "too_many_jobs",
    503: "unavailable",
}


class ApiError(Exception):
    """An answer other than success: HTTP status, stable code, a message saying what to do."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        details: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details
        self.headers = headers


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[dict[str, str]] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """Return the JSON error answer every failure uses."""
    body: dict[str, Any] = {"code": code, "message": message}
    if details:
        body["details"] = details
    return JSONResponse({"error": body}, status_code=status, headers=headers)


def field_errors(errors: list[Any], *, skip_prefix: tuple[str, ...] = ()) -> list[dict[str, str]]:
    """Return pydantic errors as `[{"field": "a.b", "message": ...}]`, dropping `skip_prefix`."""
    details = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        while loc and loc[0] in skip_prefix:
            loc.pop(0)
        message = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            message = "unknown field; remove it or check its spelling"
        details.append({"field": ".".join(loc) or "body", "message": message})
    return details


def describe_fields(details: list[dict[str, str]]) -> str:
    """Return `field: message; ...` for a one-line error message."""
    return "; ".join(f"{d['field']}: {d['message']}" for d in details)


def _closing(request: Request, headers: dict[str, str] | None) -> dict[str, str] | None:
    """Add `Connection: close` when the request carries a body the handler may not have read.

    Otherwise the server would go on receiving (and discarding) a rejected upload to its end.
    """
    declared = request.headers.get("content-length", "0")
    if declared == "0" and "transfer-encoding" not in request.headers:
        return headers
    return {**(headers or {}), "Connection": "close"}


async def _on_api_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ApiError)
    headers = _closing(request, exc.headers)
    return error_response(exc.status, exc.code, exc.message, exc.details, headers)


async def _on_core_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CompressorError)
    status = STATUS_BY_CORE_CODE.get(exc.code, 500)
    if status >= 500:
        log.error("core error %s on %s: %s", exc.code, request.url.path, exc.message)
    return error_response(status, exc.code, exc.message)


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = field_errors(list(exc.errors()), skip_prefix=("query", "path", "header", "body"))
    message = "invalid request: " + describe_fields(details)
    return error_response(422, "invalid_request", message, details, _closing(request, None))


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODE_BY_HTTP_STATUS.get(exc.status_code, "http_error")
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such route: {request.method} {request.url.path}; see /docs for the API"
    return error_response(exc.status_code, code, message, headers=_closing(request, exc.headers))


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(
        500,
        "internal_error",
        "the server hit an unexpected error; it was logged. Retry, and report it if it persists",
    )


def install_error_handlers(app: FastAPI) -> None:
    """Make every error answer with `{"error": {"code", "message"}}`."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(CompressorError, _on_core_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)


def not_found(job_id: str) -> ApiError:
    """Return the 404 for a job that does not exist or belongs to another tenant."""
    return ApiError(
        404, "not_found", f"no job {job_id!r}; list your jobs with GET /v1/jobs"
    )


def unavailable(what: str, exc: BaseException) -> ApiError:
    """Return the 503 for a store or queue that cannot be reached."""
    return ApiError(
        503,
        "unavailable",
        f"the {what} is unreachable ({type(exc).__name__}: {exc}); retry shortly, and check "
        f"/readyz and the server's {what} settings if it persists",
    )
