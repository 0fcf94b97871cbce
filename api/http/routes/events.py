"""`/v1/jobs/{id}/events`: server-sent events for a job's status, stage and progress.

The stream reads the job from the store every `events_poll_s`, so it follows jobs run by any
worker process on any machine. It sends the job whenever it changed and ends once it finished.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from fastapi import APIRouter
from fastapi.sse import EventSourceResponse, ServerSentEvent
from starlette.concurrency import run_in_threadpool

from api.http.deps import JobDep, ServicesDep
from api.http.schemas import JobPublic, error_responses

router = APIRouter(prefix="/v1/jobs", tags=["events"], responses=error_responses(401, 404))


@router.get(
    "/{job_id}/events",
    response_class=EventSourceResponse,
    summary="Follow a job (server-sent events)",
)
async def stream_job_events(job: JobDep, services: ServicesDep) -> AsyncIterator[ServerSentEvent]:
    """Send `event: job` with the job (JSON) at every change; end after it finished.

    If the job is deleted meanwhile, a last `event: deleted` is sent.
    """
    store, poll_s = services.store, services.settings.events_poll_s
    last: tuple[object, ...] | None = None
    version = 0
    current = job
    while True:
        state = (
            current.status, current.stage, current.progress, current.error, current.attempts,
            current.loss_curve[-1:],
        )
        if state != last:
            last, version = state, version + 1
            public = JobPublic.from_record(current)
            yield ServerSentEvent(event="job", id=str(version), data=public.model_dump(mode="json"))
        if current.is_finished:
            return
        await asyncio.sleep(poll_s)
        found = await run_in_threadpool(store.get, job.id)
        if found is None:
            yield ServerSentEvent(event="deleted", data={"id": job.id})
            return
        current = found
