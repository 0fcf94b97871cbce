"""Follow a job: its server-sent events, merged into its latest known state."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator

from compressor.client.jobs import Job

JobCallback = Callable[[Job], None]

_JOB_FIELDS = frozenset(
    ("status", "stage", "progress", "started_at", "finished_at", "error", "report", "artifacts")
)


class JobWatcher:
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


def sse_data(lines: Iterable[str]) -> Iterator[str]:
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
