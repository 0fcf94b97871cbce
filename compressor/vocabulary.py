"""The words the core, the service and the client share, each defined once.

Job statuses and stages, error codes, artifact names, the default server address, how to
export a program, an artifact's checksum and how a validation problem is worded. This module is
light on purpose: it imports neither torch nor onnx nor the service, so the client, the CLI and
the API can import it without paying for the pipeline.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal, get_args

__all__ = [
    "ARTIFACT_NAMES", "CALIBRATING", "CANCELLED", "DEFAULT_SERVER", "EXPORTING", "FAILED",
    "FINETUNING", "JOB_LOG_ARTIFACT", "REPORTING", "REPORT_ARTIFACT",
    "FINISHED_STATUSES", "HF_ARTIFACT", "HOW_TO_EXPORT", "HOW_TO_GIVE_CHECKPOINT", "JOB_STAGES", "JOB_STATUSES", "LOADING",
    "ONNX_ARTIFACT", "ONNX_DATA_ARTIFACT", "PLANNING", "QUEUED", "REWRITING", "RUNNING", "SUCCEEDED", "VERIFYING", "ErrorCode",
    "JobStage", "JobStatus", "describe_fields", "describe_validation_error", "field_errors",
    "job_phase", "sha256_of",
]

# -- jobs --------------------------------------------------------------------------------------

JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
JOB_STATUSES: tuple[str, ...] = get_args(JobStatus)  # queued -> running -> a finished status
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = JOB_STATUSES
FINISHED_STATUSES = frozenset({SUCCEEDED, FAILED, CANCELLED})

# The pipeline's stages, in the order they run: the one list the log, the progress events, the
# API and the console use. loading: the upload and its data; calibrating: the layers found, the
# statistics of their inputs and their decompositions; planning: each layer's size (spread by
# sensitivity, or in target mode the search over candidates); rewriting: θ initialized (and
# corrected sequentially); finetuning: θ distilled and the result scored; exporting: the ONNX
# model (and its int8 form, the Hugging Face folder); verifying: onnxruntime against PyTorch;
# reporting: latency, the artifacts moved in place, report.json.
JobStage = Literal["loading", "calibrating", "planning", "rewriting", "finetuning", "exporting",
                   "verifying", "reporting"]
JOB_STAGES: tuple[str, ...] = get_args(JobStage)
(LOADING, CALIBRATING, PLANNING, REWRITING, FINETUNING, EXPORTING, VERIFYING,
 REPORTING) = JOB_STAGES


def job_phase(status: str, stage: str | None) -> str:
    """Return where a job is, in one word: its stage while it runs, its status otherwise.

    A finished job's `stage` is the last one it ran (where a failed job stopped), not what it
    is at: lists show this instead.
    """
    return (stage or RUNNING) if status == RUNNING else status


class ErrorCode:
    """The stable `code` of every error a user can see, in a job's `error` or an API answer."""

    # A job's error: raised by the core (compressor.errors) ...
    COMPRESSOR_ERROR = "compressor_error"
    INVALID_CONFIG = "invalid_config"
    INVALID_MODEL = "invalid_model"
    UNSAFE_MODEL = "unsafe_model"
    UNSUPPORTED_MODEL = "unsupported_model"
    GUARD_FAILED = "guard_failed"
    INVALID_DATA = "invalid_data"
    INSUFFICIENT_RESOURCES = "insufficient_resources"
    EXPORT_FAILED = "export_failed"
    VERIFICATION_FAILED = "verification_failed"
    TARGET_NOT_MET = "target_not_met"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    INTERNAL_ERROR = "internal_error"
    # ... or set by the service's workers and lease reaper.
    WORKER_LOST = "worker_lost"
    INPUT_MISSING = "input_missing"

    # An API answer's error (besides INVALID_CONFIG and INTERNAL_ERROR).
    BAD_REQUEST = "bad_request"
    CLIENT_DISCONNECTED = "client_disconnected"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    NOT_FOUND = "not_found"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    CONFLICT = "conflict"
    JOB_FINISHED = "job_finished"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"
    INVALID_REQUEST = "invalid_request"
    TOO_MANY_JOBS = "too_many_jobs"
    UNAVAILABLE = "unavailable"
    HTTP_ERROR = "http_error"


# -- artifacts ---------------------------------------------------------------------------------

ONNX_ARTIFACT = "model.onnx"
# The weights of an ONNX model past 2 GiB (external data); model.onnx names it, so it keeps
# this name beside the model wherever the model is saved.
ONNX_DATA_ARTIFACT = "model.onnx.data"
HF_ARTIFACT = "model-hf.zip"  # the dense result as a Hugging Face folder, zipped
REPORT_ARTIFACT = "report.json"
JOB_LOG_ARTIFACT = "job.log"
ARTIFACT_NAMES = (ONNX_ARTIFACT, ONNX_DATA_ARTIFACT, REPORT_ARTIFACT, JOB_LOG_ARTIFACT,
                  HF_ARTIFACT)
# The folder, beside the artifacts, where a job keeps its products for a retry to resume from
# (`compressor.runtime.resume`); deleted when the job is over.
RESUME_FOLDER = "resume"


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    """Return the hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# -- the client --------------------------------------------------------------------------------

DEFAULT_SERVER = "http://127.0.0.1:8000"  # where `compressor serve` listens by default

# -- advice --------------------------------------------------------------------------------------

# Said to whoever gave something that is not a model: locally (`compress`) and to the service,
# so it names no verb of either ("upload", "run").
HOW_TO_EXPORT = (
    "Export the model as a program instead: "
    "program = torch.export.export(model, args, "
    "dynamic_shapes={'x': {0: torch.export.Dim('batch')}}) with one entry per input, then "
    "torch.export.save(program, 'model.pt2'), and compress model.pt2."
)
HOW_TO_GIVE_CHECKPOINT = (
    "A Hugging Face model folder is accepted too, as a folder or zipped (.zip / .tar.gz): "
    "config.json and model.safetensors at its top (or in its one top folder), as "
    "model.save_pretrained(folder) and tokenizer.save_pretrained(folder) write them."
)

# -- validation problems -------------------------------------------------------------------------

_UNKNOWN_FIELD = "unknown field; remove it or check its spelling"


def field_errors(
    errors: Iterable[Mapping[str, Any]],
    *,
    skip_prefix: tuple[str, ...] = (),
    whole: str = "body",
) -> list[dict[str, str]]:
    """Return pydantic errors as `[{"field": "a.b", "message": ...}]`.

    Leading location parts in `skip_prefix` are dropped; a problem with no location is named
    `whole`. An unknown field and invalid JSON get a message saying what to do.
    """
    details = []
    for err in errors:
        loc = [str(p) for p in err.get("loc", ())]
        while loc and loc[0] in skip_prefix:
            loc.pop(0)
        message = err.get("msg", "invalid value")
        if err.get("type") == "extra_forbidden":
            message = _UNKNOWN_FIELD
        elif err.get("type") == "json_invalid":
            message = f"not valid JSON ({err.get('ctx', {}).get('error', message)})"
        details.append({"field": ".".join(loc) or whole, "message": message})
    return details


def describe_fields(details: Iterable[Mapping[str, str]]) -> str:
    """Return `field: message; ...` for a one-line error message."""
    return "; ".join(f"{d['field']}: {d['message']}" for d in details)


def describe_validation_error(exc: Any, what: str = "config") -> str:
    """Return `invalid <what>: field.path: what is wrong; ...` for a pydantic ValidationError."""
    return f"invalid {what}: " + describe_fields(field_errors(exc.errors(), whole=what))
