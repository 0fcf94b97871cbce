"""The errors the core raises: each carries a stable `code` and a message a user can act on.

One place outside the core (``api/http/errors.py``) maps these classes to HTTP answers; the CLI
prints the message and exits non-zero. Messages give the rule, the offending value, the layer's dotted name
where there is one, and what to do.
"""

from __future__ import annotations

import uuid

from compressor.vocabulary import ErrorCode


class CompressorError(Exception):
    """Base of every error the core raises on purpose."""

    code = ErrorCode.COMPRESSOR_ERROR

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(CompressorError):
    """The job configuration is invalid or cannot be applied to this model."""

    code = ErrorCode.INVALID_CONFIG


class ModelFormatError(CompressorError):
    """The uploaded model file is not a loadable `torch.export` `.pt2` program."""

    code = ErrorCode.INVALID_MODEL


class UnsafeModelError(ModelFormatError):
    """The model file would need code execution (an unsafe pickle) to load; it was refused."""

    code = ErrorCode.UNSAFE_MODEL


class UnsupportedModelError(ModelFormatError):
    """The program loads, but holds something the pipeline cannot compress or verify."""

    code = ErrorCode.UNSUPPORTED_MODEL


class GuardError(CompressorError):
    """The job's inputs do not meet a guard the program was exported with."""

    code = ErrorCode.GUARD_FAILED


class DataError(CompressorError):
    """The data file does not fit the model's inputs or cannot be read."""

    code = ErrorCode.INVALID_DATA


class ResourceError(CompressorError):
    """The machine cannot run this job: too little memory or disk for the model's size."""

    code = ErrorCode.INSUFFICIENT_RESOURCES


class ExportError(CompressorError):
    """The compressed model could not be exported to ONNX."""

    code = ErrorCode.EXPORT_FAILED


class VerificationError(CompressorError):
    """onnxruntime's outputs do not match the compressed PyTorch model within tolerance."""

    code = ErrorCode.VERIFICATION_FAILED


class TargetNotMetError(CompressorError):
    """No candidate keeps the fidelity the job's `target` asks for."""

    code = ErrorCode.TARGET_NOT_MET


class CancelledError(CompressorError):
    """The job was cancelled by its owner."""

    code = ErrorCode.CANCELLED


class InterruptedJobError(CancelledError):
    """The job was stopped to be run again (its worker shuts down): what it made so far is
    kept for the retry, fine-tuning's state included."""


class JobTimeoutError(CompressorError):
    """The job ran past its `timeout_s`."""

    code = ErrorCode.TIMEOUT


class InternalError(CompressorError):
    """An unexpected failure: a bug in the compressor, not in the user's input.

    `error_id` is a short id that marks the full traceback in job.log.
    """

    code = ErrorCode.INTERNAL_ERROR

    def __init__(self, message: str, error_id: str) -> None:
        super().__init__(message)
        self.error_id = error_id

    @staticmethod
    def new_id() -> str:
        """Return a fresh short id for an internal error."""
        return uuid.uuid4().hex[:8]

    @classmethod
    def wrapping(cls, exc: BaseException, stage: str | None = None, *,
                 log_name: str = "job.log", error_id: str | None = None) -> InternalError:
        """Return the internal error that reports `exc`; its traceback goes to `log_name`."""
        error_id = error_id or cls.new_id()
        where = f" in stage {stage}" if stage else ""
        summary = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return cls(
            f"internal error {error_id}{where}: {type(exc).__name__}"
            f"{': ' + summary if summary else ''}. This is a bug in the compressor, not in your "
            f"input; the full traceback is in {log_name} under id {error_id}. Report it with "
            "that log attached.",
            error_id,
        )
