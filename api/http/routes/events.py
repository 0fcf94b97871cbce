"""`/v1/jobs/{id}/events`: server-sent events for a job's status, stage and progress.

The stream reads the job from the store every `events_poll_s`, so it follows jobs run by any
worker process on any machine. Its first event, `job`, is the whole job; after that, each
`change` event holds the job's `id` and only the fields that changed, until the job finished.
A client that reconnects gets the whole job again first.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

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
    """Send `event: job` with the whole job (JSON), then `event: change` at every change.

    A `change` holds `id` and the fields whose value changed, except that fine-tuning's new
    loss points come as `loss_curve_added` (append them) while the stored curve only grew;
    when it was thinned, `loss_curve` holds the whole curve again. The stream ends after the
    job finished; if the job is deleted meanwhile, a last `event: deleted` is sent.
    """
    store, poll_s = services.store, services.settings.events_poll_s
    sent = JobPublic.from_record(job).model_dump(mode="json")
    version = 1
    yield ServerSentEvent(event="job", id=str(version), data=sent)
    current = job
    while not current.is_finished:
        await asyncio.sleep(poll_s)
        found = await run_in_threadpool(store.get, job.id)
        if found is None:
            yield ServerSentEvent(event="deleted", data={"id": job.id})
            return
        current = found
        latest = JobPublic.from_record(current).model_dump(mode="json")
        change = job_change(sent, latest)
        if change:
            sent, version = latest, version + 1
            yield ServerSentEvent(event="change", id=str(version), data={"id": job.id, **change})


def job_change(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    """Return the fields of `after` that differ from `before` (the public job, as JSON)."""
    change = {k: v for k, v in after.items() if before.get(k) != v}
    old, new = before.get("loss_curve") or [], change.get("loss_curve")
    if new is not None and old and new[: len(old)] == old:
        del change["loss_curve"]
        change["loss_curve_added"] = new[len(old):]
    return change
