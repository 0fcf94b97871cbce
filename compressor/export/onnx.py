"""Export a model to ONNX: dynamic batch, the program's input names, one file below 2 GiB
(external data past it), and move or remove such a model's files together."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
import onnxscript.optimizer
import onnxscript.rewriter.onnx_fusions
import torch
from torch import nn
from torch.export import Dim

from compressor.errors import ExportError
from compressor.load.data import InputSpec
from compressor.runtime.outputs import call, call_arguments, onnx_output_names

# onnx's protobuf limit: past this the weights must live in an external data file.
_PROTOBUF_LIMIT = 2 * 1024**3 - 1024**2
# The index dtypes constant folding does not widen (`_keeps_indices_narrow`).
_NARROW_INTEGERS = frozenset({ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.UINT16,
                              ir.DataType.INT16})


def dynamic_shapes(specs: list[InputSpec]) -> dict[str, dict[int, object]]:
    """Return torch.export dynamic shapes: a shared `batch` dim 0 within the program's bound,
    other dynamic dims left AUTO."""
    largest = min((spec.batch_max for spec in specs if spec.batch_max), default=2**20)
    batch = Dim("batch", min=1, max=min(2**20, largest))
    return {spec.name: {i: (batch if i == 0 else Dim.AUTO)
                        for i, size in enumerate(spec.shape) if size is None or i == 0}
            for spec in specs}


def export_onnx(module: nn.Module, sample: dict[str, torch.Tensor], specs: list[InputSpec],
                path: Path, opset: int, optimize: bool = True) -> None:
    """Export `module` to ONNX at `path`, atomically (a failed export leaves no file).

    Past protobuf's 2 GiB the weights go to `<path>.data` beside it (ONNX external data, which
    the model names by that file name): both are written in a scratch folder and moved into
    place, the data file first. Below it the file is written one weight at a time
    (`save_single_file`).
    """
    path = Path(path)
    module.eval()  # before the scratch folder exists: a module that refuses leaves nothing
    try:
        with (writing_onnx(path) as tmp, torch.no_grad(),
              contextlib.redirect_stdout(io.StringIO()), logs_quiet("torch.onnx")):
            args, kwargs = call_arguments(module, sample)
            program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                dynamic_shapes=dynamic_shapes(specs),
                output_names=onnx_output_names(call(module, sample)),
                optimize=False, verbose=False, report=False)
            weights = list(program.model.graph.initializers.values())
            if optimize:
                optimize_onnx(program.model)
            _strip_debug_metadata(program.model)
            size = sum(int(t.numel() * t.element_size()) for t in module.state_dict().values())
            if size > _PROTOBUF_LIMIT:
                program.save(tmp, external_data=True)
            else:
                save_single_file(program.model, tmp)
            _release_weights(program.model, weights)
            del program, weights
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        reason = _exporter_reason(exc)
        raise ExportError(
            f"the model could not be exported to ONNX (opset {opset}): {reason}. Try "
            "export.form='dense', another export.opset, or check that the program runs with "
            "torch.onnx.export on its own") from exc


def optimize_onnx(model: ir.Model) -> None:
    """Optimize the exported `model` in place as `ONNXProgram.optimize` does (onnxscript's
    constant folding and rewrites, then its fusions), except that constant folding keeps
    small-integer index tensors at their width (`_keeps_indices_narrow`)."""
    onnxscript.optimizer.optimize_ir(model, should_fold=_keeps_indices_narrow)
    onnxscript.rewriter.onnx_fusions.fuse(model)


def _keeps_indices_narrow(node: ir.Node) -> bool | None:
    """Return False for a Cast that widens a constant 8- or 16-bit integer tensor; None
    (onnxscript's own rules) for any other node.

    `share_values` stores each weight as a uint8 (uint16) index into a float codebook and
    gathers W = codebook[idx] in the graph, casting the indices to int32 first. onnxscript
    folds every node whose constant inputs hold at most 8192 elements: the cast, then the
    Gather, so every small layer's W would land in the file as float32 (4 bytes a weight
    instead of 1, more than the dense model), and a cast alone as int32. Left unfolded, the
    file keeps the indices and the codebook, and onnxruntime gathers the same W from them.
    Nothing else changes: a model without such constants is optimized as before.
    """
    if node.domain not in ("", "ai.onnx") or node.op_type != "Cast" or not node.inputs:
        return None
    source = node.inputs[0]
    if source is None or source.const_value is None:
        return None
    to = node.attributes.get("to")
    if source.const_value.dtype not in _NARROW_INTEGERS or to is None:
        return None
    return False if ir.DataType(to.as_int()).itemsize > source.const_value.dtype.itemsize else None


@contextlib.contextmanager
def writing_onnx(target: Path) -> Iterator[Path]:
    """Yield where to write the ONNX model that becomes `target` (and its data file beside it):
    a path in a scratch folder next to `target`, moved into place when the block ends without
    an exception (`move_onnx`). The scratch folder is removed either way, so a failed write
    leaves nothing."""
    target = Path(target)
    scratch = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        yield scratch / target.name
        move_onnx(scratch / target.name, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def logs_quiet(name: str | None = None) -> Iterator[None]:
    """Show only the errors of the logger `name` (the root logger when None) in the block:
    the exporter's and the quantizers' advice is not the user's to act on."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def save_single_file(model: ir.Model, path: Path) -> None:
    """Write `model` to `path` as one ONNX file, its weights inside, one weight in memory at a
    time.

    onnx serializes a model whole: a proto holding a copy of every weight, then its bytes,
    twice the model's bytes beside the weights themselves. Protobuf parsers merge a message
    field that appears more than once (repeated fields are appended), so the model is written
    without its initializers, then one model per initializer holding only that initializer in
    its graph (and its value info): every reader sees one graph with all the initializers, in
    their order.
    """
    initializers = dict(model.graph.initializers)
    inputs = {value.name for value in model.graph.inputs}
    model.graph.initializers.clear()
    try:
        skeleton = ir.serde.serialize_model(model)
    finally:
        model.graph.initializers.update(initializers)
    with open(path, "wb") as file:
        file.write(skeleton.SerializeToString())
        for value in initializers.values():  # as `onnx_ir.serde` writes each initializer
            piece = onnx.ModelProto()
            if value.name not in inputs and (value.type is not None or value.shape is not None
                                             or value.metadata_props or value.doc_string):
                ir.serde.serialize_value_into(piece.graph.value_info.add(), value)
            if value.const_value is not None:
                value.const_value.name = value.name
                ir.serde.serialize_tensor_into(piece.graph.initializer.add(),
                                               from_=value.const_value)
            file.write(piece.SerializeToString())


def data_file(path: Path) -> Path:
    """Return where the external data of the ONNX model at `path` lives (if it has any)."""
    return path.with_name(path.name + ".data")


def onnx_files(path: Path) -> list[Path]:
    """Return the files of the ONNX model at `path`: itself, and its data file if it has one."""
    return [path] + ([data_file(path)] if data_file(path).is_file() else [])


def onnx_bytes(path: Path) -> int:
    """Return the size of the ONNX model at `path`, its external data included."""
    return sum(p.stat().st_size for p in onnx_files(path))


def move_onnx(source: Path, target: Path) -> None:
    """Move the ONNX model at `source` (with its data file) to `target`; both keep the same
    file name, so the model still finds its data. The data file moves first. A rename on one
    file system; a copy, then the source removed, across two."""
    if source.name != target.name:
        raise ValueError(f"an ONNX model with external data keeps its name: {source} -> {target}")
    data_file(target).unlink(missing_ok=True)
    if data_file(source).is_file():
        shutil.move(data_file(source), data_file(target))
    shutil.move(source, target)


def remove_onnx(path: Path) -> None:
    """Remove the ONNX model at `path` and its data file, if they exist."""
    path.unlink(missing_ok=True)
    data_file(path).unlink(missing_ok=True)


def _exporter_reason(exc: BaseException) -> str:
    """Return the first line of the innermost exception that says something, without colors."""
    chain = [exc]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for cause in reversed(chain):
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(cause)).strip()
        if text:
            return f"{type(cause).__name__}: {text.splitlines()[0][:300]}"
    return type(exc).__name__


def _release_weights(model, exported: list) -> None:
    """Drop the weights of the exported `model` once they are on disk: those it holds now (the
    optimizer's transposed copies among them) and those it was `exported` with.

    onnxscript's rewrite rules are module-level objects that keep the last graph they matched,
    and that graph keeps even the values the optimizer removed from it: without this, every
    weight of the last export stays alive until the next one, through verification and beyond.
    """
    # The graph's input list counts its values in a Counter that keeps a removed one (at 0):
    # the exporter lifts every weight as an input first, and a second name for a weight two
    # modules share (a tied table's rows and head) is dropped from the graph but lives on
    # there. onnx_ir's private field: where it is not, there is nothing to release.
    dropped = getattr(model.graph.inputs, "_ref_counter", {})
    for value in [*exported, *model.graph.initializers.values(), *dropped]:
        value.const_value = None
    model.graph.initializers.clear()


def _strip_debug_metadata(model) -> None:
    """Drop the exporter's per-node stack traces and FX dumps: they bloat the file and leak
    the server's source paths into an artifact users download."""
    for function in (model.graph, *model.functions.values()):
        for node in function.all_nodes():
            node.metadata_props.clear()
    for value in model.graph.inputs:
        value.metadata_props.clear()
