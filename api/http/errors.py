"""The one place that turns errors into HTTP answers: `{"error": {"code", "message"}}`.

Routes raise `ApiError` for bad requests; the job service raises its `JobServiceError`s; a core
`CompressorError` may come through. The handlers installed by `install_error_handlers` answer each
by its class with a fitting status and a message the caller can act on; a job store or queue
outage (`BackendUnavailable`) is a 503. Bad input never becomes a 500; only a bug does, and it is
logged with its traceback.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from api.jobs.service import (
    BackendUnavailable,
    JobAlreadyFinished,
    JobNotFound,
    JobServiceError,
    TooManyJobs,
)
from compressor.errors import (
    CancelledError,
    CompressorError,
    ConfigError,
    DataError,
    GuardError,
    JobTimeoutError,
    ModelFormatError,
    ResourceError,
)
from compressor.vocabulary import ErrorCode, describe_fields, field_errors

log = logging.getLogger("api")

# HTTP status for each core error class (and its subclasses), should one reach a request (only
# ConfigError does: the rest happen in workers and land in the job's `error`). Any other core
# error (internal, export, verification) is the server's failure: 500.
_STATUS_BY_CORE_ERROR: dict[type[CompressorError], int] = {
    ConfigError: 422,
    ModelFormatError: 422,  # and UnsafeModelError, UnsupportedModelError
    GuardError: 422,
    DataError: 422,
    CancelledError: 409,
    JobTimeoutError: 504,
    ResourceError: 507,  # no room on the data directory's disk (or too little memory)
}

_STATUS_BY_JOB_ERROR: dict[type[JobServiceError], int] = {
    JobNotFound: 404,
    JobAlreadyFinished: 409,
    TooManyJobs: 429,
    BackendUnavailable: 503,
}

_CODE_BY_HTTP_STATUS = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHORIZED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    409: ErrorCode.CONFLICT,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    416: ErrorCode.RANGE_NOT_SATISFIABLE,
    422: ErrorCode.INVALID_REQUEST,
    429: ErrorCode.TOO_MANY_JOBS,
    503: ErrorCode.UNAVAILABLE,
    507: ErrorCode.INSUFFICIENT_RESOURCES,
}


def status_for(exc: Exception, statuses: dict[Any, int], default: int) -> int:
    """Return the status `statuses` gives the closest class of `exc`, else `default`."""
    return next((statuses[cls] for cls in type(exc).__mro__ if cls in statuses), default)


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
    status = status_for(exc, _STATUS_BY_CORE_ERROR, 500)
    if status >= 500:
        log.error("core error %s on %s: %s", exc.code, request.url.path, exc.message)
    return error_response(status, exc.code, exc.message)


async def _on_job_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, JobServiceError)
    status = status_for(exc, _STATUS_BY_JOB_ERROR, 409)
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, TooManyJobs) else None
    return error_response(status, exc.code, exc.message, headers=_closing(request, headers))


async def _on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    details = field_errors(list(exc.errors()), skip_prefix=("query", "path", "header", "body"))
    message = "invalid request: " + describe_fields(details)
    return error_response(
        422, ErrorCode.INVALID_REQUEST, message, details, _closing(request, None)
    )


async def _on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODE_BY_HTTP_STATUS.get(exc.status_code, ErrorCode.HTTP_ERROR)
    message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no such route: {request.method} {request.url.path}; see /docs for the API"
    return error_response(exc.status_code, code, message, headers=_closing(request, exc.headers))


async def _on_unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(
        500,
        ErrorCode.INTERNAL_ERROR,
        "the server hit an unexpected error; it was logged. Retry, and report it if it persists",
    )


def install_error_handlers(app: FastAPI) -> None:
    """Make every error answer with `{"error": {"code", "message"}}`."""
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(CompressorError, _on_core_error)
    app.add_exception_handler(JobServiceError, _on_job_error)
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
    app.add_exception_handler(Exception, _on_unexpected_error)

