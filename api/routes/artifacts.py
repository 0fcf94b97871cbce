"""`/v1/jobs/{id}/artifacts/{name}`: download model.onnx, report.json, job.log or
model-hf.zip."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import FileResponse

from api.deps import JobDep, ServicesDep
from api.errors import ApiError
from api.schemas import error_responses

router = APIRouter(prefix="/v1/jobs", tags=["artifacts"], responses=error_responses(401, 404))

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
def download_artifact(job: JobDep, name: str, request: Request, services: ServicesDep) -> Response:
    """Stream one of the job's files, with Content-Length, ETag = sha256 and Range support."""
    artifact = next((a for a in job.artifacts if a["name"] == name), None)
    if artifact is None:
        have = ", ".join(a["name"] for a in job.artifacts) or "none yet"
        hint = "" if job.is_finished else f" (the job is {job.status}; files appear when it ends)"
        raise ApiError(
            404, "not_found", f"job {job.id} has no artifact {name!r}; it has: {have}{hint}"
        )
    path = services.files.artifact_path(job.id, name)
    if path is None:
        raise ApiError(
            404, "not_found",
            f"the artifact {name!r} of job {job.id} is missing from the data directory; "
            "submit the job again",
        )
    etag = f'"{artifact["sha256"]}"'
    headers = {"ETag": etag, "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") in (etag, "*"):
        return Response(status_code=304, headers=headers)
    return FileResponse(path, media_type=_MEDIA_TYPES.get(name, "application/octet-stream"), filename=name, headers=headers)
