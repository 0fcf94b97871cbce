"""Submit, list, find, cancel and delete jobs: what the routes ask for, without HTTP.

A failure the caller can act on raises a `JobServiceError` subclass; a job store or queue that
cannot be reached raises `BackendUnavailable`. `api.http.errors` answers each class with its
HTTP status, so the routes only translate requests and answers.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.concurrency import run_in_threadpool

from api.jobs.database import JobDatabase, JobRecord
from compressor.vocabulary import CANCELLED, RUNNING, ErrorCode

if TYPE_CHECKING:
    from api.services import Services

_DELETE_WAIT_S = 5.0  # how long a delete waits for a running job to stop before removing it
TOO_MANY_JOBS_RETRY_AFTER_S = 30


class JobServiceError(Exception):
    """A job request that cannot be done: a stable `code` and a message saying what to do."""

    code = ErrorCode.CONFLICT

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class JobNotFound(JobServiceError):
    """The job does not exist, or belongs to another tenant (who must not learn it exists)."""

    code = ErrorCode.NOT_FOUND

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job {job_id!r}; list your jobs with GET /v1/jobs")


class JobAlreadyFinished(JobServiceError):
    """The job already finished, so there is nothing to cancel."""

    code = ErrorCode.JOB_FINISHED

    def __init__(self, job: JobRecord) -> None:
        super().__init__(
            f"job {job.id} already {job.status}; there is nothing to cancel (DELETE it to "
            "remove its files)"
        )


class TooManyJobs(JobServiceError):
    """The tenant has `limit` jobs queued or running already."""

    code = ErrorCode.TOO_MANY_JOBS

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"you already have {limit} jobs queued or running (the limit per API key); wait for "
            "one to finish or cancel one, then submit again"
        )
        self.retry_after_s = TOO_MANY_JOBS_RETRY_AFTER_S


class BackendUnavailable(JobServiceError):
    """The job store or the queue could not be reached (an outage, not the caller's fault)."""

    code = ErrorCode.UNAVAILABLE

    def __init__(self, what: str, cause: BaseException) -> None:
        super().__init__(
            f"the {what} is unreachable ({type(cause).__name__}: {cause}); retry shortly, and "
            f"check /readyz and the server's {what} settings if it persists"
        )


@contextmanager
def _reaching(what: str) -> Iterator[None]:
    """Turn any failure but a `JobServiceError` into `BackendUnavailable(what)`."""
    try:
        yield
    except JobServiceError:
        raise
    except Exception as exc:
        raise BackendUnavailable(what, exc) from exc


@dataclass
class Submission:
    """The validated parts of a job submission; its files are already under the job's inputs."""

    config: dict[str, Any]
    data_format: str | None  # "safetensors", "npz", "txt", "jsonl" or None (no data file)
    model_name: str | None = None  # the model file's name as the client sent it


ReceiveUploads = Callable[[str], Awaitable[Submission]]  # job id -> its stored uploads


async def submit_job(services: Services, tenant: str, receive: ReceiveUploads) -> JobRecord:
    """Check the tenant's quota, receive the uploads, insert the job and queue it.

    A submit that would pass the quota (a concurrent one got in first) or that the store or
    queue refuses leaves nothing behind: the row and the files are removed.
    """
    limit = services.settings.max_jobs_in_flight
    with _reaching("job store"):
        in_flight = await run_in_threadpool(services.store.count_in_flight, tenant)
    if in_flight >= limit:
        raise TooManyJobs(limit)
    job_id = uuid.uuid4().hex
    submission = await receive(job_id)
    return await run_in_threadpool(_insert_and_enqueue, services, tenant, job_id, submission)


def _insert_and_enqueue(
    services: Services, tenant: str, job_id: str, submission: Submission
) -> JobRecord:
    store, limit = services.store, services.settings.max_jobs_in_flight
    try:
        with _reaching("job store or queue"):
            job = store.create(
                job_id, tenant, submission.config, submission.data_format, submission.model_name
            )
            if store.count_in_flight(tenant) > limit:  # a concurrent submit got in first
                raise TooManyJobs(limit)
            services.queue.enqueue(job_id)
    except JobServiceError:
        _forget(services, job_id)
        raise
    return job


def list_jobs(
    store: JobDatabase, tenant: str, *, status: str | None, limit: int, before_seq: int | None
) -> list[JobRecord]:
    """Return up to `limit` of the tenant's jobs, newest first, submitted before `before_seq`."""
    with _reaching("job store"):
        return store.list_jobs(tenant, status=status, limit=limit, before_seq=before_seq)


def find_job(store: JobDatabase, job_id: str, tenant: str) -> JobRecord:
    """Return the tenant's job `job_id`; `JobNotFound` when it does not exist or is another's."""
    with _reaching("job store"):
        job = store.get(job_id, tenant)
    if job is None:
        raise JobNotFound(job_id)
    return job


def cancel_job(services: Services, job: JobRecord) -> JobRecord:
    """Cancel a queued job now, or ask a running one to stop; return it as it is afterwards.

    A queued job cancelled may be a retry: what its earlier tries kept for it is deleted (a
    running one's worker deletes it when the job stops).
    """
    if job.is_finished:
        raise JobAlreadyFinished(job)
    with _reaching("job store"):
        updated = services.store.request_cancel(job.id)
    if updated is None:
        raise JobNotFound(job.id)
    if updated.is_finished and updated.status != CANCELLED:  # it finished in the meantime
        raise JobAlreadyFinished(updated)
    if updated.status == CANCELLED:
        services.files.delete_kept_products(job.id)
    return updated


async def delete_job(services: Services, job: JobRecord) -> None:
    """Cancel the job if it has not finished, wait briefly for it to stop, delete everything.

    A worker still running past the wait finds its row gone and deletes the files it left.
    """
    store = services.store
    with _reaching("job store"):
        if not job.is_finished:
            current = await run_in_threadpool(store.request_cancel, job.id)
            deadline = time.monotonic() + _DELETE_WAIT_S
            while (
                current is not None and current.status == RUNNING
                and time.monotonic() < deadline
            ):
                await asyncio.sleep(0.1)
                current = await run_in_threadpool(store.get, job.id)
        await run_in_threadpool(_forget, services, job.id)


def _forget(services: Services, job_id: str) -> None:
    try:
        services.store.delete(job_id)
    finally:
        services.files.delete_job(job_id)
