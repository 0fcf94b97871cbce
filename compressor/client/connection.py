"""`Client`: the verbs (submit, get, list, wait, cancel, delete, download) over httpx."""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from compressor.client.downloads import (
    DEFAULT_RETRIES,
    OpenStream,
    TransferCallback,
    download_resuming,
)
from compressor.client.errors import (
    ClientError,
    ConnectionFailed,
    JobFailed,
    WaitTimeout,
    error_from_response,
)
from compressor.client.events import JobCallback, JobWatcher, sse_data
from compressor.client.jobs import Job
from compressor.client.uploads import ProgressReader, pack_folder
from compressor.vocabulary import DEFAULT_SERVER, FAILED, ONNX_ARTIFACT, ONNX_DATA_ARTIFACT

_DEFAULT_PAGE_SIZE = 100  # jobs asked for per page; the server allows up to 200
_EVENT_IDLE_S = 60.0  # reconnect (or fall back to polling) after this long without an event


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
        total)` follows the upload. The credentials are checked first, so that a missing or
        wrong key is refused (`AuthError`) before a byte of the files is sent.
        """
        self._check_credentials()
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
                name: ProgressReader(stack.enter_context(path.open("rb")))
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
        watcher = JobWatcher(self.get(job_id), on_update)
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
        if watcher.job.status == FAILED:
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
        retries: int = DEFAULT_RETRIES,
    ) -> Path:
        """Save the job's artifact `name` at `dest`, checked against its sha256; return the path.

        `dest` is a file, or a folder (one that exists, or a path ending in `/`) to put `name`
        in. The bytes stream into `<dest>.part` and are checked against the sha256 the server
        announces (the `ETag`, and the job's artifact list); only then is the file renamed to
        `dest`. A mismatch raises `ChecksumMismatch` and leaves no file behind. A connection that
        drops is resumed where it stopped (`Range`), up to `retries` times; past them,
        `ConnectionFailed`, and the part stays: the next call resumes it.

        `model.onnx` brings its weights along when the job has them in `model.onnx.data` (a
        model past 2 GiB): that file is saved first, beside `dest`, under its own name, which
        is how model.onnx refers to it. `verify=False` accepts an artifact the server gave no
        sha256 for (a mismatch still raises). `on_progress(bytes_received, total)` follows the
        transfer of every file together (total 0: unknown).
        """
        folder = str(dest).endswith(("/", os.sep)) or Path(dest).is_dir()
        dest = Path(dest) / name if folder else Path(dest)
        job = self.get(job_id)
        files = [(name, dest)]
        if name == ONNX_ARTIFACT and job.artifact(ONNX_DATA_ARTIFACT) is not None:
            files.insert(0, (ONNX_DATA_ARTIFACT, dest.with_name(ONNX_DATA_ARTIFACT)))
        sizes = [getattr(job.artifact(file_name), "size", None) or 0 for file_name, _ in files]
        dest.parent.mkdir(parents=True, exist_ok=True)
        for index, (file_name, file_dest) in enumerate(files):
            listed = job.artifact(file_name)
            download_resuming(
                self._artifact_opener(job_id, file_name), file_name, file_dest,
                listed.sha256 if listed else None, listed.size if listed else None,
                on_progress=_overall(on_progress, sum(sizes[:index]), sum(sizes), len(files)),
                verify=verify, retries=retries,
            )
        return dest

    def _artifact_opener(self, job_id: str, name: str) -> OpenStream:
        path = f"{_job_path(job_id)}/artifacts/{quote(name, safe='')}"
        return lambda headers: self._stream("GET", path, headers=headers)

    # --- plumbing ---------------------------------------------------------------------------

    def _check_credentials(self) -> None:
        """Make the cheapest authenticated request (one job listed); raise what it answers."""
        self._request("GET", "/v1/jobs", params={"limit": 1})

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

    def _follow_events(self, watcher: JobWatcher, remaining: float | None) -> bool:
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
                for data in sse_data(response.iter_lines()):
                    got_event = True
                    watcher.apply_event(data)
                    if watcher.job.finished:
                        break
        except httpx.TransportError:  # idle past `idle`, or the stream broke: the caller re-reads
            pass
        return got_event


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


def _overall(
    on_progress: TransferCallback | None, before: int, listed_total: int, files: int
) -> TransferCallback | None:
    """Return a progress callback for one of several files that reports all of them together."""
    if on_progress is None or files == 1:
        return on_progress
    return lambda got, total: on_progress(before + got, listed_total or total)


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
