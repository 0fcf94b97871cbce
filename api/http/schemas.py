"""What the API answers with: JobPublic, JobsPublic, ArtifactPublic, ErrorBody (shown in /docs)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from api.jobs.database import JobRecord
from compressor.vocabulary import JobStage, JobStatus, job_phase

_JOB_ID = "3f2b9c0e5d1a4e7f8a6b2c4d9e0f1a2b"


class JobError(BaseModel):
    """Why a job failed (or was cancelled): a stable code and a message a user can act on."""

    code: str = Field(examples=["unsafe_model"])
    message: str = Field(
        examples=["the model file holds a pickled nn.Module; export it with torch.export"]
    )


class ArtifactPublic(BaseModel):
    """One file a finished job produced."""

    name: str = Field(examples=["model.onnx"])
    size: int = Field(description="bytes", examples=[1843201])
    sha256: str = Field(description="hex digest; also the download's ETag")
    url: str = Field(examples=[f"/v1/jobs/{_JOB_ID}/artifacts/model.onnx"])


class JobPublic(BaseModel):
    """One compression job."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": _JOB_ID, "model_name": "minilm.zip", "status": "running",
                    "stage": "finetuning", "progress": 0.42,
                    "created_at": "2025-01-01T12:00:00Z", "started_at": "2025-01-01T12:00:01Z",
                    "finished_at": None, "config": {"method": "lowrank", "ratio": 0.5},
                    "error": None, "report": None, "artifacts": [], "attempts": 1,
                    "retry_reason": None, "loss_curve": [[25, 0.41], [50, 0.22], [75, 0.17]],
                    "stage_times": {"loading": "2025-01-01T12:00:01Z",
                                    "finetuning": "2025-01-01T12:00:09Z"},
                }
            ]
        }
    )

    id: str
    model_name: str | None = Field(
        default=None, description="the uploaded model file's name, as the client sent it"
    )
    status: JobStatus
    stage: JobStage | None = Field(description="the pipeline stage running now, or last run")
    phase: str = Field(
        description="where the job is, in one word: its stage while it runs, its "
        "status (queued, succeeded, failed, cancelled) otherwise; what a list of jobs shows",
        examples=["finetuning", "succeeded"],
    )
    progress: float = Field(ge=0, le=1, description="the whole job's progress")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    config: dict[str, Any] = Field(description="the job's configuration, every default filled")
    error: JobError | None = Field(description="set when the job failed or was cancelled")
    report: dict[str, Any] | None = Field(description="report.json, once the job succeeded")
    artifacts: list[ArtifactPublic]
    attempts: int = Field(
        description="the job's runs that count toward COMPRESSOR_MAX_ATTEMPTS: each run "
        "started, except one a worker gave back when it shut down (the job is re-queued with "
        "retry_reason saying so, and resumes); above 1 when a worker died mid-job")
    retry_reason: str | None = Field(description="why the job was re-queued, if it was")
    resumed: str | None = Field(
        default=None,
        description="where the latest run resumed and what it reused of what an earlier try "
        "kept (decompositions, θ, sensitivities, the target search, fine-tuning's state); "
        "null when it started from the beginning",
        examples=["resumed at fine-tuning step 400 of 1000; reused: decompositions (84 of 84 "
                  "layers), θ as corrected, sensitivities, fine-tuning's state"],
    )
    loss_curve: list[tuple[int, float]] = Field(
        default_factory=list,
        description="fine-tuning's training loss as [step, loss] points, evenly spaced over the "
        "steps run so far (at most 100; live while the job fine-tunes); the held-out losses are "
        "in report.finetune.history once the job succeeded",
    )
    stage_times: dict[JobStage, datetime] = Field(
        default_factory=dict,
        description="when each stage of the latest run started (the job store's clock), in "
        "the order they ran; a stage's time is its start, the next stage's is its end",
    )

    @classmethod
    def from_record(cls, job: JobRecord) -> JobPublic:
        """Return the public view of a stored job."""
        return cls(
            id=job.id,
            model_name=job.model_name,
            status=job.status,  # type: ignore[arg-type]
            stage=job.stage,  # type: ignore[arg-type]
            phase=job_phase(job.status, job.stage),
            progress=job.progress,
            created_at=_utc(job.created_at),
            started_at=_utc(job.started_at),
            finished_at=_utc(job.finished_at),
            config=job.config,
            error=JobError(**job.error) if job.error else None,
            report=job.report,
            artifacts=[
                ArtifactPublic(**a, url=f"/v1/jobs/{job.id}/artifacts/{a['name']}")
                for a in job.artifacts
            ],
            attempts=job.attempts,
            retry_reason=job.retry_reason,
            resumed=job.resumed,
            loss_curve=[(int(step), float(loss)) for step, loss in job.loss_curve],
            stage_times={
                stage: datetime.fromtimestamp(at, UTC) for stage, at in job.stage_times.items()
            },
        )


class JobsPublic(BaseModel):
    """A page of the caller's jobs, newest first."""

    data: list[JobPublic]
    next_cursor: str | None = Field(
        description="pass as ?cursor= for the next page; null on the last page"
    )


class ErrorDetail(BaseModel):
    """One field that failed validation."""

    field: str = Field(examples=["finetune.steps"])
    message: str = Field(examples=["Input should be greater than or equal to 0"])


class ErrorInfo(BaseModel):
    """What went wrong."""

    code: str = Field(examples=["invalid_config"])
    message: str = Field(
        examples=["invalid config: finetune.steps: Input should be greater than or equal to 0"]
    )
    details: list[ErrorDetail] | None = None


class ErrorBody(BaseModel):
    """Every error answer: `{"error": {"code", "message"}}`."""

    error: ErrorInfo


class ReadyStatus(BaseModel):
    """Readiness: each dependency and whether it answered."""

    status: Literal["ready", "unavailable"]
    checks: dict[str, str] = Field(
        examples=[{"store": "ok", "queue": "ok", "files": "ok", "workers": "ok"}]
    )
    live_workers: int | None = Field(
        default=None,
        description="job worker processes that sent a heartbeat within a lease (null when the "
        "store could not be read)",
    )


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """Return the OpenAPI `responses` entry documenting these error statuses with ErrorBody."""
    descriptions = {
        401: "missing or wrong API key",
        404: "no such job for this caller",
        409: "the job already finished",
        413: "the upload is larger than the server's limit",
        415: "the file is not a .pt2 program or checkpoint archive (or a .safetensors, .npz, "
        ".txt or .jsonl data file)",
        422: "invalid config or form; the message names the field",
        429: "too many of the caller's jobs are queued or running",
        503: "the store or the queue is unreachable",
        507: "the data directory has no room for the upload and its job's artifacts",
    }
    return {s: {"model": ErrorBody, "description": descriptions.get(s, "error")} for s in statuses}
