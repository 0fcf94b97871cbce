"""`/v1/jobs`: submit, list, read, cancel and delete compression jobs."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response

from api.http.deps import JobDep, ServicesDep, StoreDep, TenantDep
from api.http.errors import ApiError
from api.http.schemas import JobPublic, JobsPublic, error_responses
from api.http.uploads import receive_job
from api.jobs import service
from api.jobs.service import Submission
from compressor.vocabulary import ErrorCode, JobStatus

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401))

_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["model"],
                    "properties": {
                        "model": {
                            "type": "string", "format": "binary",
                            "description": "a torch.export program saved with torch.export.save, "
                            "or a Hugging Face model folder (config.json, *.safetensors, tokenizer) "
                            "packed as .zip, .tar or .tar.gz",
                        },
                        "config": {
                            "type": "string",
                            "description": "the job config as JSON (section 4 of the spec); "
                            "every field has a default",
                            "example": '{"method": "lowrank", "ratio": 0.5}',
                        },
                        "data": {
                            "type": "string", "format": "binary",
                            "description": "optional .safetensors or .npz of inputs named after "
                            "the program's inputs; for a Hugging Face checkpoint also .txt (a "
                            "sample a line) or .jsonl (a \"text\" field a line)",
                        },
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses=error_responses(413, 415, 422, 429, 503, 507),
    openapi_extra=_UPLOAD_BODY,
    summary="Submit a compression job",
)
async def create_job(
    request: Request, response: Response, services: ServicesDep, tenant: TenantDep
) -> JobPublic:
    """Store the uploaded program (and data), queue the job, answer 202 with its URL."""

    async def receive(job_id: str) -> Submission:
        settings = services.settings
        return await receive_job(
            request, services.files, job_id, settings.max_upload_bytes, settings.disk_reserve_bytes
        )

    job = await service.submit_job(services, tenant, receive)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.from_record(job)


def _encode_cursor(seq: int) -> str:
    return base64.urlsafe_b64encode(f"seq:{seq}".encode()).decode().rstrip("=")


def _decode_cursor(cursor: str) -> int:
    try:
        text = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        kind, _, value = text.partition(":")
        if kind != "seq" or not value.isdigit():
            raise ValueError(text)
        return int(value)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise ApiError(
            422, ErrorCode.INVALID_REQUEST,
            "invalid cursor: pass the `next_cursor` of a previous page unchanged",
            details=[{"field": "cursor", "message": "not a cursor this server issued"}],
        ) from None


@router.get("", response_model=JobsPublic, responses=error_responses(422), summary="List jobs")
def list_jobs(
    store: StoreDep,
    tenant: TenantDep,
    status: Annotated[JobStatus | None, Query(description="only jobs in this status")] = None,
    limit: Annotated[int, Query(ge=1, le=200, description="page size")] = 50,
    cursor: Annotated[str | None, Query(max_length=100, description="from next_cursor")] = None,
) -> JobsPublic:
    """Return the caller's jobs, newest first, a page at a time."""
    before = _decode_cursor(cursor) if cursor else None
    page = service.list_jobs(store, tenant, status=status, limit=limit + 1, before_seq=before)
    next_cursor = _encode_cursor(page[limit - 1].seq) if len(page) > limit else None
    return JobsPublic(data=[JobPublic.from_record(j) for j in page[:limit]], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobPublic, responses=error_responses(404), summary="Get a job")
async def read_job(job: JobDep) -> JobPublic:
    """Return one of the caller's jobs."""
    return JobPublic.from_record(job)


@router.post(
    "/{job_id}/cancel",
    status_code=202,
    response_model=JobPublic,
    responses=error_responses(404, 409),
    summary="Cancel a job",
)
def cancel_job(job: JobDep, services: ServicesDep) -> JobPublic:
    """Cancel a queued job now, or ask a running one to stop (it does within seconds)."""
    return JobPublic.from_record(service.cancel_job(services, job))


@router.delete(
    "/{job_id}", status_code=204, responses=error_responses(404), summary="Delete a job"
)
async def delete_job(job: JobDep, services: ServicesDep) -> Response:
    """Cancel the job if it has not finished, then delete its files and its record."""
    await service.delete_job(services, job)
    return Response(status_code=204)
