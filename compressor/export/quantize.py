"""Stack onnxruntime's quantization on an exported model (dynamic int8, or int4 weight-only
through MatMulNBits), and check what it cost."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np

from compressor.errors import ExportError, ResourceError, VerificationError
from compressor.export.onnx import data_file, logs_quiet, onnx_bytes, writing_onnx
from compressor.export.verify import TorchOutputs, float64_chunks, paired_outputs
from compressor.runtime.memory import quantizing_peak_bytes, shortfall

# int4 weights are quantized in blocks of this many consecutive inputs (rows of a MatMul's
# weight, entries of a table's row), each block with its own scale and zero point. 32 rather
# than the quantizer's 128, measured on all-MiniLM-L6-v2's original export (held-out cosine to
# the float model, file size): block 32 0.974, 54.7 MB; 64 0.966, 53.9 MB; 128 0.958, 53.6 MB
# (MatMul weights only; with the embedding tables too, block 32: 0.972, 14.6 MB). Symmetric
# blocks at 32 lose more (0.966) for 0.2 MB less.
INT4_BLOCK_SIZE = 32


def quantize_int8(source: Path, target: Path, *, onnxruntime_defaults: bool = False,
                  largest_weight_bytes: int | None = None) -> None:
    """Write `source` with int8 weights (onnxruntime dynamic quantization, per channel) to
    `target`, atomically. MatMul and Gather weights become int8 (and every other op onnxruntime
    quantizes dynamically); activations are quantized on the fly at run time. Raises
    `ResourceError` first when the machine lacks the memory it needs (`ensure_room`).

    Unless `onnxruntime_defaults` (what a user would run: `quantize_dynamic` as it comes, the
    baseline), three things differ from onnxruntime's defaults, all measured:
    - Convolutions stay float: onnxruntime's ConvInteger has no fast CPU kernel (the digits
      CNN at batch 32: 1.4 ms float, 4.3 ms with its convs int8, 0.66 ms with its MatMuls only),
      so the artifact leaves them to low rank.
    - Weights use 7 bits ([-64, 64], `reduce_range`): on x86 CPUs without VNNI (AVX2 only)
      onnxruntime multiplies uint8 inputs by int8 weights with an instruction whose 16-bit sums
      saturate; full-range weights then cost a tiny MLP a relative L2 of 0.116 where 7 bits
      cost 0.016 (on a VNNI CPU both are close to the float). The artifact must hold on the CPU
      it is deployed to, which the job cannot know.
    - An embedding table only a Gather reads (`_lookup_tables`) is stored in 4 bits, in blocks
      of `INT4_BLOCK_SIZE` entries of a row with a scale and zero point each
      (GatherBlockQuantized; `MatMulNBitsQuantizer`'s asymmetric blocks), where int8 stores a
      uint8 table with one scale: a lookup does no arithmetic on it, so the 4 bits cost no time,
      and they halve the bytes of the half of a small encoder that is its table
      (all-MiniLM-L6-v2: 18.5 MB against 22.8 MB, cosine to the original 0.9610 against 0.9621
      with int8 tables, the MatMuls int8 as onnxruntime makes them by default). A table another
      node reads too (a tied head's) stays uint8, as int8 quantizes it for both.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.quantization.registry import IntegerOpsRegistry

    op_types = (None if onnxruntime_defaults
                else sorted(op for op in IntegerOpsRegistry if op != "Conv"))
    ensure_room("int8", source, largest_weight_bytes)
    external = data_file(Path(source)).is_file()
    try:
        tables = [] if onnxruntime_defaults else _lookup_tables(source)
        # logs_quiet: its advice to pre-process is for static quantization
        with writing_onnx(target) as tmp, logs_quiet(), contextlib.redirect_stdout(io.StringIO()):
            quantize_dynamic(source, tmp, weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=op_types, reduce_range=not onnxruntime_defaults,
                             nodes_to_exclude=tables, use_external_data_format=external)
            if tables:
                _tables_in_four_bits(tmp, tables, external)
    except Exception as exc:  # onnxruntime's quantizer raises many types
        raise ExportError(f"int8 quantization of the ONNX model failed: {exc}. Export without "
                          "export.quantize, or try export.form='dense'") from exc


def _lookup_tables(path: Path) -> list[str]:
    """Return the Gather nodes of the ONNX model at `path` that read a float 2-D initializer no
    other node reads: the embedding tables int8 stores in 4 bits."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    readers = _initializer_readers(model)
    tables = {t.name for t in model.graph.initializer
              if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2}
    return [node.name for node in model.graph.node if node.op_type == "Gather" and node.name
            and node.input[0] in tables and len(readers[node.input[0]]) == 1]


def _tables_in_four_bits(path: Path, tables: list[str], external: bool) -> None:
    """Rewrite the Gather nodes `tables` of the ONNX model at `path` (in place) as
    GatherBlockQuantized over 4-bit tables; nothing else changes."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    model = onnx.load(str(path))
    others = [node.name for node in model.graph.node if node.name not in tables]
    quantizer = MatMulNBitsQuantizer(model, block_size=INT4_BLOCK_SIZE,
                                     op_types_to_quantize=("Gather",), nodes_to_exclude=others)
    del model
    # an all-zero block (a padding row) has scale 0; numpy warns of the division it evaluated
    with np.errstate(divide="ignore", invalid="ignore"):
        quantizer.process()
    quantizer.model.save_model_to_file(str(path), use_external_data_format=external)


def quantize_int4(source: Path, target: Path, *, onnxruntime_defaults: bool = False,
                  largest_weight_bytes: int | None = None) -> None:
    """Write `source` with 4-bit weights (onnxruntime's weight-only `MatMulNBitsQuantizer`) to
    `target`, atomically. Every MatMul with a constant 2-D weight becomes MatMulNBits (weights
    in blocks of `INT4_BLOCK_SIZE` inputs, asymmetric: a scale and zero point per block);
    Gemm layers (a Linear on 2-D inputs) are rewritten as MatMul + Add first, as onnxruntime's
    int8 quantizer does, so that they count. Activations stay float: the weights are
    dequantized as they are read, so the file shrinks and the arithmetic does not.

    Unless `onnxruntime_defaults` (the quantizer as it comes: blocks of 128, MatMul weights
    only; the baseline), constant embedding tables read by Gather are 4-bit too
    (GatherBlockQuantized): in a small encoder they are half the bytes, which int8 quantizes
    as well. Convolutions stay float: there is no 4-bit convolution.

    Raises `ExportError` when the quantizer fails, or when the graph has no weight it can
    quantize (a convolution-only model); `ResourceError` first when the machine lacks the
    memory it needs (`ensure_room`).
    """
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    from onnxruntime.quantization.onnx_model import ONNXModel

    ensure_room("int4", source, largest_weight_bytes)
    try:
        # logs_quiet: it warns that it raises the opset for int4 tables
        with writing_onnx(target) as tmp:
            with logs_quiet(), contextlib.redirect_stdout(io.StringIO()):
                model = ONNXModel(onnx.load(str(source)))
                model.replace_gemm_with_matmul()
                if onnxruntime_defaults:
                    quantizer = MatMulNBitsQuantizer(model.model)
                else:
                    quantizer = MatMulNBitsQuantizer(
                        model.model, block_size=INT4_BLOCK_SIZE,
                        op_types_to_quantize=("MatMul", "Gather"),
                        nodes_to_exclude=_shared_tables(model.model))
                del model
                # an all-zero block (an embedding table's padding row) has scale 0: the
                # quantizer's np.where picks its zero point, but numpy warns of the division
                # it evaluated anyway ("invalid value encountered in divide"), in the job log
                with np.errstate(divide="ignore", invalid="ignore"):
                    quantizer.process()
            if not _count_ops(quantizer.model.model.graph, {"MatMulNBits", "GatherBlockQuantized"}):
                raise ExportError(
                    "int4 quantizes the constant weights of MatMul (Linear layers, the compact "
                    "form's matmuls) and Gather (embedding tables) only, and this model has none "
                    "(its weights are convolutions, or computed at run time): use "
                    "export.quantize 'int8', or export without export.quantize")
            quantizer.model.save_model_to_file(
                str(tmp), use_external_data_format=data_file(Path(source)).is_file())
    except ExportError:
        raise
    except Exception as exc:  # onnxruntime's quantizer raises many types
        raise ExportError(f"int4 quantization of the ONNX model failed: {exc}. Try "
                          "export.quantize 'int8', or export without export.quantize") from exc


def ensure_room(quantize: str, source: Path, largest_weight_bytes: int | None) -> None:
    """Raise `ResourceError` when the machine lacks the memory onnxruntime's `quantize` needs
    for the float model at `source` (`memory.quantizing_peak_bytes`; its largest weight taken
    as large as the whole model when `largest_weight_bytes` is None): it holds the model
    several times over, and running out halfway would have the kernel kill the job."""
    model_bytes = onnx_bytes(source)
    largest = model_bytes if largest_weight_bytes is None else largest_weight_bytes
    reason = shortfall(quantizing_peak_bytes(quantize, model_bytes, largest),
                       f"{quantize} quantization of the {model_bytes / 1e6:,.1f} MB ONNX model")
    if reason is not None:
        raise ResourceError(f"{reason}: export without export.quantize, or run the job on a "
                            "machine with more memory")


def _shared_tables(model) -> list[str]:
    """Return the Gather nodes whose table another node also reads, and those other nodes: a
    tied LM head's factor is a MatMul's weight and its table's rows at once. The quantizer packs
    a weight one way for MatMulNBits and another for GatherBlockQuantized and would give both
    the one it made last (an invalid model onnxruntime refuses to load), so such a weight stays
    float, stored once."""
    excluded = []
    for nodes in _initializer_readers(model).values():
        if len(nodes) > 1 and any(node.op_type == "Gather" for node in nodes):
            excluded += [node.name for node in nodes]
    return excluded


def _initializer_readers(model) -> dict[str, list]:
    """Return, for each initializer of `model`'s graph, the nodes that read it."""
    readers: dict[str, list] = {tensor.name: [] for tensor in model.graph.initializer}
    for node in model.graph.node:
        for name in node.input:
            if name in readers:
                readers[name].append(node)
    return readers


def _count_ops(graph, op_types: set[str]) -> int:
    """Return how many nodes of `graph` (and of its subgraphs) are of `op_types`."""
    import onnx

    count = 0
    for node in graph.node:
        count += node.op_type in op_types
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.GRAPH:
                count += _count_ops(attribute.g, op_types)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                count += sum(_count_ops(g, op_types) for g in attribute.graphs)
    return count


def verify_quantized(path: Path, reference: TorchOutputs, tolerance: float | None,
                     quantize: str = "int8") -> dict:
    """Check a quantized (`quantize`: "int8" or "int4") ONNX model against the outputs
    `reference` of the float PyTorch model it was made from.

    Quantized weights cannot match to float tolerances; what they must do is stay close: each
    float output's relative L2 difference (‖onnx − torch‖ / ‖torch‖ over the samples) at most
    `tolerance`. Raises `VerificationError` otherwise. `tolerance` None measures only (target
    mode judges the quantized model by its fidelity to the original instead).
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
                f"the {quantize} model differs from the compressed PyTorch model on {name} by a "
                f"relative L2 of {error:.3g}, over export.quantized_tolerance={tolerance:g}. The "
                "artifact was not kept; export without export.quantize, or raise the tolerance "
                "if this precision is acceptable")
    return {"passed": True, "samples": reference.samples, "quantized_tolerance": tolerance,
            "relative_l2": errors}
