"""`/v1/jobs/{id}/artifacts/{name}`: download model.onnx (and model.onnx.data), report.json,
job.log or model-hf.zip.

A finished job's artifacts are served from its record (size, sha256 as the ETag), with byte
ranges so an interrupted download resumes: `Range: bytes=N-` answers 206 with `Content-Range`,
a range that starts past the end answers 416 (with `Content-Range: bytes */size`), and
`If-Range` with anything but the current ETag answers the whole file (200), so a client never
stitches two different files together. A Range header that does not parse is ignored (RFC 9110).
While a job runs, its job.log grows a line at a time; it is served as it is at the moment of the
request, without an ETag (it is still changing) and without ranges, so a page or `curl` can
follow a running job; before its worker wrote the first line, it is empty (not a 404).
"""

from __future__ import annotations

import re
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool
from starlette.types import Receive, Scope, Send

from api.http.deps import JobDep, ServicesDep
from api.http.errors import ApiError
from api.http.schemas import error_responses
from api.jobs.database import JobRecord
from api.services import Services
from compressor.vocabulary import (
    HF_ARTIFACT,
    JOB_LOG_ARTIFACT,
    ONNX_ARTIFACT,
    ONNX_DATA_ARTIFACT,
    REPORT_ARTIFACT,
    ErrorCode,
)

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"], responses=error_responses(401, 404))

_RANGE_SPEC = re.compile(r"([0-9]*)\s*-\s*([0-9]*)", re.ASCII)
_RUNNING_LOG_LIMIT = 4 << 20  # a running job's log is served up to its newest 4 MiB

_MEDIA_TYPES = {
    ONNX_ARTIFACT: "application/octet-stream",
    ONNX_DATA_ARTIFACT: "application/octet-stream",  # the weights of a model past 2 GiB
    REPORT_ARTIFACT: "application/json",
    JOB_LOG_ARTIFACT: "text/plain; charset=utf-8",
    HF_ARTIFACT: "application/zip",  # the dense result as a Hugging Face folder
}


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {t: {} for t in _MEDIA_TYPES.values()}, "description": "the file"},
        206: {"description": "the requested byte range (`Range: bytes=...`; with `If-Range`, "
              "only while the ETag still matches)"},
        304: {"description": "unchanged since the ETag in `If-None-Match`"},
        416: {"description": "the range starts past the end of the file "
              "(`Content-Range: bytes */size`)"},
    },
    summary="Download an artifact",
)
async def download_artifact(
    job: JobDep, name: str, request: Request, services: ServicesDep
) -> Response:
    """Stream one of the job's files, with Content-Length, ETag = sha256 and Range support.

    `Range: bytes=N-` resumes a download (206); send `If-Range: <ETag>` with it, and a file
    that changed since is answered whole (200).

    While the job is queued or running, job.log is answered with what it holds so far, empty
    before its first line (no ETag, `X-Job-Status` names the job's status).
    """
    if name == JOB_LOG_ARTIFACT and not job.is_finished:
        path = services.files.artifact_path(job.id, name)
        return await run_in_threadpool(_running_log, path, job.status)
    return await run_in_threadpool(_finished_artifact, job, name, request, services)


def _running_log(path: Path | None, status: str) -> Response:
    headers = {"Cache-Control": "no-store", "X-Job-Status": status, "Accept-Ranges": "none"}
    if path is None:  # queued, or its worker has not written the first line yet
        return Response(b"", media_type=_MEDIA_TYPES[JOB_LOG_ARTIFACT], headers=headers)
    # Read once: the file keeps growing, and a streamed answer would outgrow its Content-Length.
    with open(path, "rb") as file:
        file.seek(0, 2)
        size = file.tell()
        start = max(0, size - _RUNNING_LOG_LIMIT)
        file.seek(start)
        content = file.read(size - start)
    if start > 0:  # keep the newest whole lines of a huge log
        content = content[content.find(b"\n") + 1:]
        headers["X-Log-Truncated"] = "true"
    return Response(content, media_type=_MEDIA_TYPES[JOB_LOG_ARTIFACT], headers=headers)


def _finished_artifact(
    job: JobRecord, name: str, request: Request, services: Services
) -> Response:
    artifact = next((a for a in job.artifacts if a["name"] == name), None)
    if artifact is None:
        have = ", ".join(a["name"] for a in job.artifacts) or "none yet"
        hint = "" if job.is_finished else (
            f" (the job is {job.status}; job.log appears once it starts, the other files when it "
            "succeeds)"
        )
        raise ApiError(
            404, ErrorCode.NOT_FOUND, f"job {job.id} has no artifact {name!r}; it has: {have}{hint}"
        )
    path = services.files.artifact_path(job.id, name)
    if path is None:
        raise ApiError(
            404, ErrorCode.NOT_FOUND,
            f"the artifact {name!r} of job {job.id} is missing from the data directory; "
            "submit the job again",
        )
    etag = f'"{artifact["sha256"]}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") in (etag, "*"):
        return Response(status_code=304, headers=headers)
    media_type = _MEDIA_TYPES.get(name, "application/octet-stream")
    size = path.stat().st_size
    honour_range = _honours_range(request, etag, size)
    return _ArtifactFile(
        path, media_type=media_type, filename=name, headers=headers, honour_range=honour_range
    )


def _honours_range(request: Request, etag: str, size: int) -> bool:
    """Return whether the request's `Range` is served (206); raise the 416 if it cannot be.

    False serves the whole file: no Range, an `If-Range` other than the current ETag (the file
    the client holds part of is not this one), or a Range that does not parse.
    """
    header = request.headers.get("range")
    if header is None:
        return False
    if_range = request.headers.get("if-range")
    if if_range is not None and if_range != etag:
        return False
    starts = _range_starts(header, size)
    if starts is None:
        return False
    if any(start >= size for start in starts):
        raise ApiError(
            416, ErrorCode.RANGE_NOT_SATISFIABLE,
            f"the range {header!r} starts past the end of the file, which has {size} bytes; "
            "ask for bytes=0- (or no Range) to download it whole",
            headers={"Content-Range": f"bytes */{size}", "ETag": etag},
        )
    return True


def _range_starts(header: str, size: int) -> list[int] | None:
    """Return the first byte of every range in `bytes=a-b, c-, -n`; None if it does not parse."""
    unit, _, specs = header.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    starts = []
    for spec in specs.split(","):
        matched = _RANGE_SPEC.fullmatch(spec.strip())
        if matched is None or matched.group(1) == matched.group(2) == "":
            return None
        first, last = matched.groups()
        if first and last and int(last) < int(first):
            return None
        # A suffix range `-n` asks for the last n bytes; `-0` asks for none (unsatisfiable).
        starts.append(int(first) if first else max(size - int(last), 0) if int(last) else size)
    return starts


class _ArtifactFile(FileResponse):
    """A `FileResponse` that serves the whole file when the route chose to ignore `Range`.

    Starlette serves the Range itself (single ranges as 206, several as multipart/byteranges);
    the route has already answered the cases it words differently (416 as a JSON error, an
    unparsable Range ignored instead of a plain-text 400).
    """

    def __init__(self, *args: object, honour_range: bool, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.honour_range = honour_range

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.honour_range:
            headers = [(k, v) for k, v in scope["headers"] if k not in (b"range", b"if-range")]
            scope = {**scope, "headers": headers}
        await super().__call__(scope, receive, send)
