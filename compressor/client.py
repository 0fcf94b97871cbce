"""Talk to a running compression service over its REST API (`/v1`), on httpx.

    from compressor.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        job = client.submit("model.pt2", {"method": "lowrank", "ratio": 0.5})
        job = client.wait(job.id, on_update=lambda job: print(job.stage, job.progress))
        client.download(job.id, "model.onnx", "out/")

Every failure raises a `ClientError` subclass carrying the server's `status_code`, `code` and
`message`; uploads stream from disk; downloads are checked against their sha256 and renamed into
place atomically, so a bad download leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

import httpx

__all__ = [
    "DEFAULT_SERVER", "Artifact", "AuthError", "ChecksumMismatch", "Client", "ClientError",
    "ConflictError", "ConnectionFailed", "Job", "JobError", "JobFailed", "NotFoundError",
    "RateLimitedError", "RequestTooLargeError", "ServerError", "ValidationFailed", "WaitTimeout",
]

DEFAULT_SERVER = "http://127.0.0.1:8000"
FINISHED_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
_CHUNK_BYTES = 1 << 20
_DEFAULT_PAGE_SIZE = 100  # jobs asked for per page; the server allows up to 200
_EVENT_IDLE_S = 60.0  # reconnect (or fall back to polling) after this long without an event
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")

TransferCallback = Callable[[int, int], None]  # (bytes moved so far, bytes in total)
JobCallback = Callable[["Job"], None]


# --- errors ---------------------------------------------------------------------------------


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
        error = job.error or JobError("unknown", "the job failed without saying why")
        super().__init__(f"job {job.id} failed ({error.code}): {error.message}", code=error.code)
        self.job = job


_ERROR_BY_STATUS: dict[int, type[ClientError]] = {
    401: AuthError, 403: AuthError, 404: NotFoundError, 409: ConflictError,
    413: RequestTooLargeError, 415: ValidationFailed, 422: ValidationFailed,
    429: RateLimitedError,
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


# --- what the server returns ----------------------------------------------------------------


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable `code` and a message a user can act on."""

    code: str
    message: str


@dataclass(frozen=True)
class Artifact:
    """One file a job produced (`model.onnx`, `report.json`, `job.log`)."""

    name: str
    size: int | None = None
    sha256: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class Job:
    """One compression job as the server describes it; `raw` is the JSON it was parsed from."""

    id: str
    status: str
    stage: str | None = None
    progress: float = 0.0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    config: dict[str, Any] = field(default_factory=dict)
    error: JobError | None = None
    report: dict[str, Any] | None = None
    artifacts: tuple[Artifact, ...] = ()
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Job:
        """Parse a job from the server's JSON; a `ClientError` if it is not a job."""
        if not isinstance(data, dict) or "id" not in data or "status" not in data:
            raise ClientError(f"the server answered something that is not a job: {data!r:.200}")
        error = data.get("error")
        return cls(
            id=str(data["id"]),
            status=str(data["status"]),
            stage=data.get("stage"),
            progress=float(data.get("progress") or 0.0),
            created_at=_parse_time(data.get("created_at")),
            started_at=_parse_time(data.get("started_at")),
            finished_at=_parse_time(data.get("finished_at")),
            config=data.get("config") or {},
            error=JobError(str(error.get("code")), str(error.get("message")))
            if isinstance(error, dict) else None,
            report=data.get("report"),
            artifacts=tuple(
                Artifact(a["name"], a.get("size"), a.get("sha256"), a.get("url"))
                for a in data.get("artifacts") or () if isinstance(a, dict) and "name" in a
            ),
            raw=data,
        )

    @property
    def finished(self) -> bool:
        """Whether the job reached `succeeded`, `failed` or `cancelled`."""
        return self.status in FINISHED_STATUSES

    def artifact(self, name: str) -> Artifact | None:
        """Return the artifact called `name`, or None while the job has none by that name."""
        return next((a for a in self.artifacts if a.name == name), None)


def _parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None


# --- the client -----------------------------------------------------------------------------


@contextmanager
def pack_folder(folder: Path) -> Iterator[Path]:
    """Zip a model folder's files (not hidden ones) into a temporary file; yield its path."""
    files = sorted(p for p in folder.rglob("*")
                   if p.is_file() and not any(part.startswith(".")
                                              for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError(f"{folder} holds no files to upload")
    with tempfile.TemporaryDirectory(prefix="compressor-upload-") as tmp:
        packed = Path(tmp) / f"{folder.resolve().name or 'model'}.zip"
        with zipfile.ZipFile(packed, "w") as archive:
            for path in files:
                method = zipfile.ZIP_STORED if path.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
                archive.write(path, path.relative_to(folder).as_posix(), compress_type=method)
        yield packed


class Client:
    """A connection to one compression service; use it as a context manager to close it.

    `server` is the service's base URL; `api_key` is sent as `Authorization: Bearer <key>`;
    `timeout` bounds each request in seconds (an upload or a download may take longer in total,
    as long as bytes keep moving). `transport` is for tests (`httpx.MockTransport`).
    """

    def __init__(
        self,
        server: str = DEFAULT_SERVER,
        api_key: str | None = None,
        *,
        timeout: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.server = _normalize_server(server)
        self._timeout = timeout
        headers = {"User-Agent": "compressor-client", "Accept": "application/json"}
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        self._http = httpx.Client(
            base_url=self.server, headers=headers, timeout=timeout, transport=transport
        )

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def submit(
        self,
        model_path: str | os.PathLike[str],
        config: dict[str, Any] | str | None = None,
        data_path: str | os.PathLike[str] | None = None,
        *,
        on_upload: TransferCallback | None = None,
    ) -> Job:
        """Upload a `.pt2` program (and optional data file) as a new job; return it queued.

        `model_path` may also be a Hugging Face model folder: it is packed into a temporary
        .zip first (links followed, hidden files left out). `config` is a dict or a JSON string
        (None: the server's defaults). The files stream from disk; `on_upload(bytes_sent,
        total)` follows the upload.
        """
        paths = {"model": Path(model_path)}
        if data_path is not None:
            paths["data"] = Path(data_path)
        form = {} if config is None else {
            "config": config if isinstance(config, str) else json.dumps(config)
        }
        with ExitStack() as stack:
            if paths["model"].is_dir():
                paths["model"] = stack.enter_context(pack_folder(paths["model"]))
            readers = {
                name: _ProgressReader(stack.enter_context(path.open("rb")))
                for name, path in paths.items()
            }
            total = sum(os.fstat(r.fileno()).st_size for r in readers.values())
            if on_upload is not None:
                for reader in readers.values():
                    reader.on_read = lambda: on_upload(
                        sum(r.position for r in readers.values()), total
                    )
            files = {
                name: (paths[name].name, reader, "application/octet-stream")
                for name, reader in readers.items()
            }
            response = self._request("POST", "/v1/jobs", data=form, files=files)
        return Job.from_json(_json(response))

    def get(self, job_id: str) -> Job:
        """Return the job's current state."""
        return Job.from_json(_json(self._request("GET", _job_path(job_id))))

    def list(
        self, status: str | None = None, limit: int | None = None, *, page_size: int | None = None
    ) -> Iterator[Job]:
        """Yield the caller's jobs, newest first, following the server's pages.

        `status` filters; `limit` caps how many are yielded in all (None: every job);
        `page_size` is how many to ask for per request (at most the server's maximum, 200).
        """
        params: dict[str, Any] = {} if status is None else {"status": status}
        yielded = 0
        while True:
            wanted = _DEFAULT_PAGE_SIZE if limit is None else limit - yielded
            if wanted <= 0:
                return
            params["limit"] = min(wanted, page_size or _DEFAULT_PAGE_SIZE)
            page = _json(self._request("GET", "/v1/jobs", params=params))
            items = page.get("data") if isinstance(page, dict) else None
            if not isinstance(items, list):
                raise ClientError(f"GET /v1/jobs answered without a 'data' list: {page!r:.200}")
            for item in items:
                yield Job.from_json(item)
                yielded += 1
                if limit is not None and yielded >= limit:
                    return
            cursor = page.get("next_cursor")
            if not cursor or not items:
                return
            params["cursor"] = cursor

    def wait(
        self,
        job_id: str,
        *,
        on_update: JobCallback | None = None,
        poll_interval: float = 1.0,
        timeout: float | None = None,
    ) -> Job:
        """Block until the job finishes; return it, or raise `JobFailed` if it failed.

        Follows the job's server-sent events when the server offers them and polls every
        `poll_interval` seconds otherwise. `on_update(job)` runs on every change of status,
        stage or progress. A `cancelled` job is returned, not raised. Past `timeout` seconds,
        raises `WaitTimeout` (the job keeps running on the server).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        watcher = _JobWatcher(self.get(job_id), on_update)
        use_events = True
        while not watcher.job.finished:
            remaining = _remaining(deadline)
            if remaining is not None and remaining <= 0:
                job = watcher.job
                raise WaitTimeout(
                    f"job {job.id} is still {job.status} (stage {job.stage}, "
                    f"{job.progress:.0%}) after {timeout:g} s; it keeps running on the server: "
                    f"wait again, or cancel it", job,
                )
            if use_events:
                use_events = self._follow_events(watcher, remaining)
            else:
                time.sleep(poll_interval if remaining is None else min(poll_interval, remaining))
            watcher.update(self.get(job_id))
        if watcher.job.status == "failed":
            raise JobFailed(watcher.job)
        return watcher.job

    def cancel(self, job_id: str) -> Job:
        """Stop a queued or running job and return it; `ConflictError` if it already finished."""
        response = self._request("POST", _job_path(job_id) + "/cancel")
        return Job.from_json(_json(response)) if response.content else self.get(job_id)

    def delete(self, job_id: str) -> None:
        """Cancel the job if needed and delete it and its files on the server."""
        self._request("DELETE", _job_path(job_id))

    def download(
        self,
        job_id: str,
        name: str,
        dest: str | os.PathLike[str],
        *,
        on_progress: TransferCallback | None = None,
        verify: bool = True,
    ) -> Path:
        """Save the job's artifact `name` at `dest`, checked against its sha256; return the path.

        `dest` is a file, or a folder (one that exists, or a path ending in `/`) to put `name`
        in. The bytes stream into a temporary file beside `dest` and are checked against the sha256
        the server announces (the `ETag`, and the job's artifact list); only then is the file
        renamed to `dest`. A mismatch raises `ChecksumMismatch` and leaves no file behind.
        `verify=False` accepts an artifact the server gave no sha256 for (a mismatch still
        raises). `on_progress(bytes_received, total)` follows the transfer (total 0: unknown).
        """
        folder = str(dest).endswith(("/", os.sep)) or Path(dest).is_dir()
        dest = Path(dest) / name if folder else Path(dest)
        listed = self.get(job_id).artifact(name)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                path = f"{_job_path(job_id)}/artifacts/{quote(name, safe='')}"
                with self._stream("GET", path, headers={"Accept": "*/*"}) as response:
                    expected = {
                        digest for digest in (
                            _sha256_from_etag(response.headers.get("etag")),
                            listed.sha256.lower() if listed and listed.sha256 else None,
                        ) if digest
                    }
                    total = int(response.headers.get("content-length") or 0)
                    actual, received = _copy_hashing(response, out, total, on_progress)
                out.flush()
                os.fsync(out.fileno())
            if total and received != total:
                raise ClientError(
                    f"the download of {name} ended after {received} of {total} bytes; try again"
                )
            _check_digest(name, actual, expected, verify)
            os.replace(part, dest)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(part)
            raise
        return dest

    # --- plumbing ---------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        if response.is_error:
            raise error_from_response(response)
        return response

    @contextmanager
    def _stream(self, method: str, path: str, **kwargs: Any) -> Iterator[httpx.Response]:
        try:
            with self._http.stream(method, path, **kwargs) as response:
                if response.is_error:
                    response.read()
                    raise error_from_response(response)
                yield response
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def _unreachable(self, exc: httpx.TransportError) -> ConnectionFailed:
        if isinstance(exc, httpx.TimeoutException):
            return ConnectionFailed(
                f"the compressor server at {self.server} did not answer within "
                f"{self._timeout:g} s ({type(exc).__name__}); check that it is up and not "
                "overloaded, or raise the client timeout"
            )
        return ConnectionFailed(
            f"could not reach the compressor server at {self.server} "
            f"({exc or type(exc).__name__}); check that it is running and that --server / "
            "COMPRESSOR_SERVER points at it"
        )

    def _follow_events(self, watcher: _JobWatcher, remaining: float | None) -> bool:
        """Apply the job's server-sent events until it finishes or the stream ends or idles.

        Return whether following events is worth another try (False: the server has no event
        stream for this job, or it closed without a single event; poll instead).
        """
        idle = _EVENT_IDLE_S if remaining is None else max(0.1, min(_EVENT_IDLE_S, remaining))
        got_event = False
        try:
            with self._http.stream(
                "GET", _job_path(watcher.job.id) + "/events",
                headers={"Accept": "text/event-stream"},
                timeout=httpx.Timeout(self._timeout, read=idle),
            ) as response:
                content_type = response.headers.get("content-type", "")
                if response.is_error or not content_type.startswith("text/event-stream"):
                    return False
                for data in _sse_data(response.iter_lines()):
                    got_event = True
                    watcher.apply_event(data)
                    if watcher.job.finished:
                        break
        except httpx.TransportError:  # idle past `idle`, or the stream broke: the caller re-reads
            pass
        return got_event


class _JobWatcher:
    """Hold a job's latest state and call `on_update` whenever its progress changes."""

    def __init__(self, job: Job, on_update: JobCallback | None) -> None:
        self.job = job
        self._on_update = on_update
        self._notify()

    def update(self, job: Job) -> None:
        """Take `job` as the latest state; notify if its status, stage, progress or error moved."""
        before = (self.job.status, self.job.stage, self.job.progress, self.job.error)
        self.job = job
        if (job.status, job.stage, job.progress, job.error) != before:
            self._notify()

    def apply_event(self, data: str) -> None:
        """Merge one event's JSON (the job, or the fields that changed) into the job."""
        try:
            payload = json.loads(data)
        except ValueError:
            return
        if isinstance(payload, dict) and isinstance(payload.get("job"), dict):
            payload = payload["job"]
        if not isinstance(payload, dict) or payload.get("id", self.job.id) != self.job.id:
            return
        known = {k: v for k, v in payload.items() if k in _JOB_FIELDS}
        self.update(Job.from_json({**self.job.raw, **known}))

    def _notify(self) -> None:
        if self._on_update is not None:
            self._on_update(self.job)


_JOB_FIELDS = frozenset(
    ("status", "stage", "progress", "started_at", "finished_at", "error", "report", "artifacts")
)


class _ProgressReader:
    """Give httpx's multipart encoder a file to read in chunks, counting the bytes read."""

    def __init__(self, file: BinaryIO) -> None:
        self._file = file
        self.position = 0
        self.on_read: Callable[[], None] | None = None

    def read(self, size: int = -1) -> bytes:
        chunk = self._file.read(size)
        self.position += len(chunk)
        if chunk and self.on_read is not None:
            self.on_read()
        return chunk

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        self.position = self._file.seek(offset, whence)
        return self.position

    def tell(self) -> int:
        return self._file.tell()

    def fileno(self) -> int:
        return self._file.fileno()


def _sse_data(lines: Iterable[str]) -> Iterator[str]:
    """Yield the `data` of each server-sent event (multi-line data joined by newlines)."""
    data: list[str] = []
    for line in lines:
        if not line:
            if data:
                yield "\n".join(data)
            data = []
        elif not line.startswith(":"):  # a comment (keep-alive) otherwise
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield "\n".join(data)


def _copy_hashing(
    response: httpx.Response, out: BinaryIO, total: int, on_progress: TransferCallback | None
) -> tuple[str, int]:
    digest = hashlib.sha256()
    received = 0
    for chunk in response.iter_bytes(_CHUNK_BYTES):
        out.write(chunk)
        digest.update(chunk)
        received += len(chunk)
        if on_progress is not None:
            on_progress(received, total)
    return digest.hexdigest(), received


def _check_digest(name: str, actual: str, expected: set[str], verify: bool) -> None:
    if not expected:
        if verify:
            raise ChecksumMismatch(
                f"the server gave no sha256 for {name} (no ETag, not in the job's artifact list), "
                "so the download cannot be verified; pass verify=False to accept it unchecked"
            )
        return
    if expected != {actual}:
        raise ChecksumMismatch(
            f"{name} arrived with sha256 {actual}, but the server announced "
            f"{' and '.join(sorted(expected))}; nothing was saved; download it again, and if it "
            "keeps failing the file on the server is damaged"
        )


def _sha256_from_etag(etag: str | None) -> str | None:
    """Return the sha256 hex digest an ETag such as `"abc…"` or `W/"sha256:abc…"` carries."""
    if not etag:
        return None
    value = etag.removeprefix("W/").strip('"').lower()
    value = value.removeprefix("sha256:").removeprefix("sha256-")
    return value if _SHA256_HEX.fullmatch(value) else None


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise ClientError(
            f"{response.request.method} {response.request.url} answered HTTP "
            f"{response.status_code} with a body that is not JSON: {response.text[:200]!r}; is "
            "--server / COMPRESSOR_SERVER the compressor service?"
        ) from None


def _job_path(job_id: str) -> str:
    return f"/v1/jobs/{quote(str(job_id), safe='')}"


def _remaining(deadline: float | None) -> float | None:
    return None if deadline is None else deadline - time.monotonic()


def _normalize_server(server: str) -> str:
    server = server.strip().rstrip("/")
    if not re.match(r"https?://[^/]", server):
        raise ClientError(
            f"the server address must be a URL like http://HOST:PORT; got {server!r} "
            "(check --server / COMPRESSOR_SERVER)"
        )
    return server
