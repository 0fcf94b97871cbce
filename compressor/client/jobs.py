"""What the server returns: a `Job`, its `JobError` and its `Artifact`s."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from compressor.client.errors import ClientError
from compressor.vocabulary import FINISHED_STATUSES, job_phase


@dataclass(frozen=True)
class JobError:
    """Why a job failed: a stable `code` and a message a user can act on."""

    code: str
    message: str


@dataclass(frozen=True)
class Artifact:
    """One file a job produced (`model.onnx`, `report.json`, `job.log`)."""

    name: str
    size: int | None = None
    sha256: str | None = None
    url: str | None = None


@dataclass(frozen=True)
class Job:
    """One compression job as the server describes it; `raw` is the JSON it was parsed from."""

    id: str
    status: str
    stage: str | None = None
    progress: float = 0.0
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    config: dict[str, Any] = field(default_factory=dict)
    error: JobError | None = None
    report: dict[str, Any] | None = None
    artifacts: tuple[Artifact, ...] = ()
    # where the latest run resumed and what it reused of an earlier try's products (None: no)
    resumed: str | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, data: Any) -> Job:
        """Parse a job from the server's JSON; a `ClientError` if it is not a job."""
        if not isinstance(data, dict) or "id" not in data or "status" not in data:
            raise ClientError(f"the server answered something that is not a job: {data!r:.200}")
        error = data.get("error")
        return cls(
            id=str(data["id"]),
            status=str(data["status"]),
            stage=data.get("stage"),
            progress=float(data.get("progress") or 0.0),
            created_at=_parse_time(data.get("created_at")),
            started_at=_parse_time(data.get("started_at")),
            finished_at=_parse_time(data.get("finished_at")),
            config=data.get("config") or {},
            error=JobError(str(error.get("code")), str(error.get("message")))
            if isinstance(error, dict) else None,
            report=data.get("report"),
            artifacts=tuple(
                Artifact(a["name"], a.get("size"), a.get("sha256"), a.get("url"))
                for a in data.get("artifacts") or () if isinstance(a, dict) and "name" in a
            ),
            resumed=data.get("resumed"),
            raw=data,
        )

    @property
    def phase(self) -> str:
        """Where the job is: its stage while it runs, its status (the outcome) otherwise."""
        return job_phase(self.status, self.stage)

    @property
    def finished(self) -> bool:
        """Whether the job reached `succeeded`, `failed` or `cancelled`."""
        return self.status in FINISHED_STATUSES

    def artifact(self, name: str) -> Artifact | None:
        """Return the artifact called `name`, or None while the job has none by that name."""
        return next((a for a in self.artifacts if a.name == name), None)


def _parse_time(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(value, tz=UTC)
    try:
        return datetime.fromisoformat(str(value))
    except ValueError:
        return None
