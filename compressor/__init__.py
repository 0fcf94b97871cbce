"""Compress a trained PyTorch program into a tied or low-rank form and export verified ONNX.

    import compressor
    result = compressor.compress("model.pt2", {"method": "lowrank", "ratio": 0.5},
                                 out_dir="out/")
    result.model_path    # out/model.onnx, verified with onnxruntime
    result.report        # what report.json holds
"""

from compressor.errors import (
    CancelledError,
    CompressorError,
    ConfigError,
    DataError,
    ExportError,
    GuardError,
    InternalError,
    JobTimeoutError,
    ModelFormatError,
    UnsafeModelError,
    UnsupportedModelError,
    VerificationError,
)
from compressor.runtime.progress import ProgressEvent

__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline pulls in torch and onnx, and the config the registry of methods (torch): load
    # them on first use, so `compressor.client`, `compressor.vocabulary` and the CLI start fast.
    if name in ("compress", "Result"):
        from compressor import pipeline

        return getattr(pipeline, name)
    if name == "CompressionConfig":
        from compressor.config import CompressionConfig

        return CompressionConfig
    raise AttributeError(f"module 'compressor' has no attribute {name!r}")

__all__ = [
    "CancelledError", "CompressionConfig", "CompressorError", "ConfigError", "DataError",
    "ExportError", "GuardError", "InternalError", "JobTimeoutError", "ModelFormatError",
    "ProgressEvent", "Result", "UnsafeModelError", "UnsupportedModelError", "VerificationError",
    "compress",
]
