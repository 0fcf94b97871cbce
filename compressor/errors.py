"""The errors the core raises: each carries a stable `code` and a message a user can act on.

One place outside the core (``api/errors.py``) maps codes to HTTP answers; the CLI prints the
message and exits non-zero. Messages give the rule, the offending value, the layer's dotted name
where there is one, and what to do.
"""

from __future__ import annotations


class CompressorError(Exception):
    """Base of every error the core raises on purpose."""

    code = "compressor_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class ConfigError(CompressorError):
    """The job configuration is invalid or cannot be applied to this model."""

    code = "invalid_config"


class ModelFormatError(CompressorError):
    """The uploaded model file is not a loadable `torch.export` `.pt2` program."""

    code = "invalid_model"


class UnsafeModelError(ModelFormatError):
    """The model file would need code execution (an unsafe pickle) to load; it was refused."""

    code = "unsafe_model"


class DataError(CompressorError):
    """The data file does not fit the model's inputs or cannot be read."""

    code = "invalid_data"


class ExportError(CompressorError):
    """The compressed model could not be exported to ONNX."""

    code = "export_failed"


class VerificationError(CompressorError):
    """onnxruntime's outputs do not match the compressed PyTorch model within tolerance."""

    code = "verification_failed"


class CancelledError(CompressorError):
    """The job was cancelled by its owner."""

    code = "cancelled"


class JobTimeoutError(CompressorError):
    """The job ran past its `timeout_s`."""

    code = "timeout"
