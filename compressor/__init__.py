"""Compress a trained PyTorch program into a tied or low-rank form and export verified ONNX.

    import compressor
    result = compressor.compress("model.pt2", {"method": "lowrank", "ratio": 0.5},
                                 out_dir="out/")
    result.model_path    # out/model.onnx, verified with onnxruntime
    result.report        # what report.json holds
"""

from compressor.config import CompressionConfig
from compressor.errors import (
    CancelledError,
    CompressorError,
    ConfigError,
    DataError,
    ExportError,
    JobTimeoutError,
    ModelFormatError,
    UnsafeModelError,
    VerificationError,
)
from compressor.pipeline import Result, compress
from compressor.progress import ProgressEvent

__version__ = "0.1.0"

__all__ = [
    "CancelledError", "CompressionConfig", "CompressorError", "ConfigError", "DataError",
    "ExportError", "JobTimeoutError", "ModelFormatError", "ProgressEvent", "Result",
    "UnsafeModelError", "VerificationError", "compress",
]
