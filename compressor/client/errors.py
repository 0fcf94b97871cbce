"""The client's errors, one class per kind of failure, and the error for a server's answer.

Every failure raises a `ClientError` subclass carrying the server's `status_code`, `code` and
`message`.
"""

from __future__ import annotations

import json
from contextlib import suppress
from typing import TYPE_CHECKING

import httpx

if TYPE_CHECKING:
    from compressor.client.jobs import Job


class ClientError(Exception):
    """A request failed; `message` says why (the server's own words when it answered)."""

    def __init__(
        self, message: str, *, status_code: int | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.code = code


class AuthError(ClientError):
    """The server refused the API key (401) or the action (403)."""


class NotFoundError(ClientError):
    """No such job or artifact, or it belongs to another tenant (404)."""


class ConflictError(ClientError):
    """The job's state forbids the action, e.g. cancelling a finished job (409)."""


class RateLimitedError(ClientError):
    """Too many jobs in flight for this tenant (429); `retry_after` is in seconds if given."""

    retry_after: float | None = None


class RequestTooLargeError(ClientError):
    """The upload is larger than the server accepts (413)."""


class ValidationFailed(ClientError):
    """The server rejected the upload: an invalid config or form (422), a wrong file type (415)."""


class ServerError(ClientError):
    """The server failed on its side (5xx)."""


class InsufficientStorage(ServerError):
    """The server has no room on its disk for the upload and its job's artifacts (507)."""


class ConnectionFailed(ClientError):
    """The server could not be reached, or did not answer in time."""


class ChecksumMismatch(ClientError):
    """A downloaded artifact's sha256 differs from the one the server announced."""


class WaitTimeout(ClientError):
    """`Client.wait` gave up before the job finished; `job` is its last known state."""

    def __init__(self, message: str, job: Job) -> None:
        super().__init__(message)
        self.job = job


class JobFailed(ClientError):
    """The job ended as `failed`; `job.error` holds the server's code and message."""

    def __init__(self, job: Job) -> None:
        code, message = (
            (job.error.code, job.error.message) if job.error
            else ("unknown", "the job failed without saying why")
        )
        super().__init__(f"job {job.id} failed ({code}): {message}", code=code)
        self.job = job


_ERROR_BY_STATUS: dict[int, type[ClientError]] = {
    401: AuthError, 403: AuthError, 404: NotFoundError, 409: ConflictError,
    413: RequestTooLargeError, 415: ValidationFailed, 422: ValidationFailed,
    429: RateLimitedError, 507: InsufficientStorage,
}


def error_from_response(response: httpx.Response) -> ClientError:
    """Return the typed error for a 4xx/5xx answer, with the code and message of its body."""
    code, message = _error_body(response)
    status = response.status_code
    if not message:
        message = f"{response.request.method} {response.request.url} answered HTTP {status}"
    error_type = _ERROR_BY_STATUS.get(status) or (ServerError if status >= 500 else ClientError)
    error = error_type(message, status_code=status, code=code)
    if isinstance(error, RateLimitedError):
        with suppress(TypeError, ValueError):  # absent, or an HTTP date: leave it None
            error.retry_after = float(response.headers.get("retry-after"))
    return error


def _error_body(response: httpx.Response) -> tuple[str | None, str]:
    """Return (code, message) from `{"error": {...}}`, FastAPI's `{"detail": ...}`, or text."""
    try:
        body = response.json()
    except ValueError:
        return None, response.text.strip()[:500]
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
        return error.get("code"), str(error.get("message") or "")
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):  # request validation: [{"loc": [...], "msg": ...}]
            detail = "; ".join(
                f"{'.'.join(str(p) for p in item.get('loc', []))}: {item.get('msg')}"
                for item in detail if isinstance(item, dict)
            )
        return None, str(detail)
    return None, json.dumps(body)[:500]
