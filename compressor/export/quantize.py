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


def quantize_int8(source: Path, target: Path, *, onnxruntime_defaults: bool = False) -> None:
    """Write `source` with int8 weights (onnxruntime dynamic quantization, per channel) to
    `target`, atomically. MatMul and Gather weights become int8 (and every other op onnxruntime
    quantizes dynamically); activations are quantized on the fly at run time.

    Unless `onnxruntime_defaults` (what a user would run: `quantize_dynamic` as it comes, the
    baseline), two things differ from onnxruntime's defaults, both measured:
    - Convolutions stay float: onnxruntime's ConvInteger has no fast CPU kernel (the digits
      CNN at batch 32: 1.4 ms float, 4.3 ms with its convs int8, 0.66 ms with its MatMuls only),
      so the artifact leaves them to low rank.
    - Weights use 7 bits ([-64, 64], `reduce_range`): on x86 CPUs without VNNI (AVX2 only)
      onnxruntime multiplies uint8 inputs by int8 weights with an instruction whose 16-bit sums
      saturate; full-range weights then cost a tiny MLP a relative L2 of 0.116 where 7 bits
      cost 0.016 (on a VNNI CPU both are close to the float). The artifact must hold on the CPU
      it is deployed to, which the job cannot know.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    op_types = (None if onnxruntime_defaults
                else sorted(op for op in IntegerOpsRegistry if op != "Conv"))

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
                                 op_types_to_quantize=op_types,
                                 reduce_range=not onnxruntime_defaults,
                                 use_external_data_format=data_file(Path(source)).is_file())
        finally:
            root.setLevel(level)
        move_onnx(tmp, target)
        shutil.rmtree(scratch, ignore_errors=True)
    except Exception as exc:  # onnxruntime's quantizer raises many types
        shutil.rmtree(scratch, ignore_errors=True)
        raise ExportError(f"int8 quantization of the ONNX model failed: {exc}. Export without "
                          "export.quantize, or try export.form='dense'") from exc


def verify_quantized(path: Path, reference: TorchOutputs, tolerance: float | None) -> dict:
    """Check an int8 ONNX model against the outputs `reference` of the float PyTorch model it
    was made from.

    int8 cannot match to float tolerances; what it must do is stay close: each float output's
    relative L2 difference (‖onnx − torch‖ / ‖torch‖ over the samples) at most `tolerance`.
    Raises `VerificationError` otherwise. `tolerance` None measures only (target mode judges
    the int8 model by its fidelity to the original instead).
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
        if tolerance is not None and not error <= tolerance:
            raise VerificationError(
                f"the int8 model differs from the compressed PyTorch model on {name} by a "
                f"relative L2 of {error:.3g}, over export.quantized_tolerance={tolerance:g}. The "
                "artifact was not kept; export without export.quantize, or raise the tolerance "
                "if this precision is acceptable")
    return {"passed": True, "samples": reference.samples, "quantized_tolerance": tolerance,
            "relative_l2": errors}
