"""Stack onnxruntime's dynamic int8 quantization on an exported model, and check what it cost."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from compressor.errors import ExportError, VerificationError
from compressor.export.onnx import data_file, move_onnx
from compressor.export.verify import TorchOutputs, float64_chunks, paired_outputs


def quantize_int8(source: Path, target: Path) -> None:
    """Write `source` with int8 weights (onnxruntime dynamic quantization, per channel) to
    `target`, atomically. MatMul, Conv and Gather weights become int8; activations are
    quantized on the fly at run time."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    target = Path(target)
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    tmp = scratch / target.name
    try:
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)  # its advice to pre-process is for static quantization
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                quantize_dynamic(source, tmp, weight_type=QuantType.QInt8, per_channel=True,
                                 use_external_data_format=data_file(Path(source)).is_file())
        finally:
            root.setLevel(level)
        move_onnx(tmp, target)
        shutil.rmtree(scratch, ignore_errors=True)
    except Exception as exc:  # onnxruntime's quantizer raises many types
        shutil.rmtree(scratch, ignore_errors=True)
        raise ExportError(f"int8 quantization of the ONNX model failed: {exc}. Export without "
                          "export.quantize, or try export.form='dense'") from exc


def verify_quantized(path: Path, reference: TorchOutputs, tolerance: float) -> dict:
    """Check an int8 ONNX model against the outputs `reference` of the float PyTorch model it
    was made from.

    int8 cannot match to float tolerances; what it must do is stay close: each float output's
    relative L2 difference (‖onnx − torch‖ / ‖torch‖ over the samples) at most `tolerance`.
    Raises `VerificationError` otherwise.
    """
    squared: dict[str, list[float]] = {}  # output -> [‖onnx − torch‖², ‖torch‖²]
    for name, want, got in paired_outputs(path, reference):
        if not np.issubdtype(want.dtype, np.floating):
            continue
        sums = squared.setdefault(name, [0.0, 0.0])
        for expected, actual in float64_chunks(want, got):
            sums[0] += float(np.square(actual - expected).sum())
            sums[1] += float(np.square(expected).sum())
    errors = {name: (diff / max(norm, 1e-60)) ** 0.5 for name, (diff, norm) in squared.items()}
    for name, error in errors.items():
        if not error <= tolerance:
            raise VerificationError(
                f"the int8 model differs from the compressed PyTorch model on {name} by a "
                f"relative L2 of {error:.3g}, over export.quantized_tolerance={tolerance:g}. The "
                "artifact was not kept; export without export.quantize, or raise the tolerance "
                "if this precision is acceptable")
    return {"passed": True, "samples": reference.samples, "quantized_tolerance": tolerance,
            "relative_l2": errors}
