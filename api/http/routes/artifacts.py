"""`/v1/jobs/{id}/artifacts/{name}`: download model.onnx, report.json, job.log or model-hf.zip.

A finished job's artifacts are served from its record (size, sha256 as the ETag). While a job
runs, its job.log grows a line at a time; it is served as it is at the moment of the request,
without an ETag (it is still changing), so a page or `curl` can follow a running job.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse
from starlette.concurrency import run_in_threadpool

from api.http.deps import JobDep, ServicesDep
from api.http.errors import ApiError
from api.http.schemas import error_responses
from api.jobs.database import JobRecord
from api.services import Services
from compressor.vocabulary import ErrorCode

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"], responses=error_responses(401, 404))

_RUNNING_LOG_LIMIT = 4 << 20  # a running job's log is served up to its newest 4 MiB

_MEDIA_TYPES = {
    "model.onnx": "application/octet-stream",
    "report.json": "application/json",
    "job.log": "text/plain; charset=utf-8",
    "model-hf.zip": "application/zip",  # the dense result as a Hugging Face folder
}


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {t: {} for t in _MEDIA_TYPES.values()}, "description": "the file"},
        206: {"description": "the requested byte range (`Range: bytes=...`)"},
        304: {"description": "unchanged since the ETag in `If-None-Match`"},
    },
    summary="Download an artifact",
)
async def download_artifact(
    job: JobDep, name: str, request: Request, services: ServicesDep
) -> Response:
    """Stream one of the job's files, with Content-Length, ETag = sha256 and Range support.

    While the job is queued or running, job.log is answered with what it holds so far (no ETag,
    `X-Job-Status` names the job's status).
    """
    if name == "job.log" and not job.is_finished:
        path = services.files.artifact_path(job.id, name)
        if path is not None:
            return await run_in_threadpool(_running_log, path, job.status)
    return await run_in_threadpool(_finished_artifact, job, name, request, services)


def _running_log(path: Path, status: str) -> Response:
    # Read once: the file keeps growing, and a streamed answer would outgrow its Content-Length.
    with open(path, "rb") as file:
        file.seek(0, 2)
        size = file.tell()
        start = max(0, size - _RUNNING_LOG_LIMIT)
        file.seek(start)
        content = file.read(size - start)
    headers = {"Cache-Control": "no-store", "X-Job-Status": status}
    if start > 0:  # keep the newest whole lines of a huge log
        content = content[content.find(b"\n") + 1:]
        headers["X-Log-Truncated"] = "true"
    return Response(content, media_type=_MEDIA_TYPES["job.log"], headers=headers)


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
    return FileResponse(path, media_type=media_type, filename=name, headers=headers)
