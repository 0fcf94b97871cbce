"""`/v1/jobs`: submit, list, read, cancel and delete compression jobs."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from api.deps import JobDep, ServicesDep, StoreDep, TenantDep
from api.errors import ApiError, not_found, unavailable
from api.schemas import JobPublic, JobsPublic, JobStatus, error_responses
from api.store import CANCELLED, RUNNING, JobRecord
from api.uploads import receive_job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=error_responses(401))

_DELETE_WAIT_S = 5.0  # how long DELETE waits for a running job to stop before removing it

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


def _too_many_jobs(limit: int) -> ApiError:
    return ApiError(
        429, "too_many_jobs",
        f"you already have {limit} jobs queued or running (the limit per API key); wait for "
        "one to finish or cancel one, then submit again",
        headers={"Retry-After": "30"},
    )


@router.post(
    "",
    status_code=202,
    response_model=JobPublic,
    responses=error_responses(413, 415, 422, 429, 503),
    openapi_extra=_UPLOAD_BODY,
    summary="Submit a compression job",
)
async def create_job(
    request: Request, response: Response, services: ServicesDep, tenant: TenantDep
) -> JobPublic:
    """Store the uploaded program (and data), queue the job, answer 202 with its URL."""
    store, files, limit = services.store, services.files, services.settings.max_jobs_in_flight
    if await run_in_threadpool(store.count_in_flight, tenant) >= limit:
        raise _too_many_jobs(limit)
    job_id = uuid.uuid4().hex
    received = await receive_job(request, files, job_id, services.settings.max_upload_bytes)
    try:
        job = await run_in_threadpool(
            store.create, job_id, tenant, received.config, received.data_format
        )
        if await run_in_threadpool(store.count_in_flight, tenant) > limit:  # a concurrent submit
            raise _too_many_jobs(limit)
        await run_in_threadpool(services.queue.enqueue, job_id)
    except ApiError:
        await run_in_threadpool(_forget, services, job_id)
        raise
    except Exception as exc:
        await run_in_threadpool(_forget, services, job_id)
        raise unavailable("job store or queue", exc) from exc
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobPublic.from_record(job)


def _forget(services: ServicesDep, job_id: str) -> None:
    try:
        services.store.delete(job_id)
    finally:
        services.files.delete_job(job_id)


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
            422, "invalid_request",
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
    try:
        page = store.list_jobs(tenant, status=status, limit=limit + 1, before_seq=before)
    except Exception as exc:
        raise unavailable("job store", exc) from exc
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
def cancel_job(job: JobDep, store: StoreDep) -> JobPublic:
    """Cancel a queued job now, or ask a running one to stop (it does within seconds)."""
    if job.is_finished:
        raise _already_finished(job)
    updated = store.request_cancel(job.id)
    if updated is None:
        raise not_found(job.id)
    if updated.is_finished and updated.status != CANCELLED:  # it finished in the meantime
        raise _already_finished(updated)
    return JobPublic.from_record(updated)


def _already_finished(job: JobRecord) -> ApiError:
    return ApiError(
        409, "job_finished",
        f"job {job.id} already {job.status}; there is nothing to cancel (DELETE it to remove "
        "its files)",
    )


@router.delete(
    "/{job_id}", status_code=204, responses=error_responses(404), summary="Delete a job"
)
async def delete_job(job: JobDep, services: ServicesDep) -> Response:
    """Cancel the job if it has not finished, then delete its files and its record."""
    store = services.store
    if not job.is_finished:
        current = await run_in_threadpool(store.request_cancel, job.id)
        deadline = time.monotonic() + _DELETE_WAIT_S
        while current is not None and current.status == RUNNING and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            current = await run_in_threadpool(store.get, job.id)
    # A worker still running past the wait finds its row gone and deletes the files it left.
    await run_in_threadpool(_forget, services, job.id)
    return Response(status_code=204)
