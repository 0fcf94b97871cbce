"""Talk to a running compression service over its REST API (`/v1`), on httpx.

    from compressor.client import Client

    with Client("http://127.0.0.1:8000", api_key="...") as client:
        job = client.submit("model.pt2", {"method": "lowrank", "ratio": 0.5})
        job = client.wait(job.id, on_update=lambda job: print(job.stage, job.progress))
        client.download(job.id, "model.onnx", "out/")

Every failure raises a `ClientError` subclass carrying the server's `status_code`, `code` and
`message`; uploads stream from disk; downloads go through `<dest>.part`, resume where a dropped
connection (or an earlier run) stopped, are checked against their sha256 and renamed into place
atomically, so a bad download leaves nothing behind; `model.onnx` brings `model.onnx.data`.

The parts: `connection` (the `Client` and its verbs), `errors`, `jobs` (what the server
returns), `uploads`, `downloads` and `events` (following a job).
"""

from compressor.client.connection import Client
from compressor.client.errors import (
    AuthError,
    ChecksumMismatch,
    ClientError,
    ConflictError,
    ConnectionFailed,
    InsufficientStorage,
    JobFailed,
    NotFoundError,
    RateLimitedError,
    RequestTooLargeError,
    ServerError,
    ValidationFailed,
    WaitTimeout,
    error_from_response,
)
from compressor.client.jobs import Artifact, Job, JobError
from compressor.client.uploads import pack_folder
from compressor.vocabulary import DEFAULT_SERVER, FINISHED_STATUSES

__all__ = [
    "DEFAULT_SERVER", "FINISHED_STATUSES", "Artifact", "AuthError", "ChecksumMismatch", "Client",
    "ClientError", "ConflictError", "ConnectionFailed", "InsufficientStorage", "Job", "JobError",
    "JobFailed", "NotFoundError", "RateLimitedError", "RequestTooLargeError", "ServerError",
    "ValidationFailed", "WaitTimeout", "error_from_response", "pack_folder",
]
