"""Export a model to ONNX (dynamic batch, the program's input names) and verify it.

Verification runs onnxruntime and the PyTorch model on the same held-out inputs, at batch 1 and
at a larger batch, and fails loudly when any output differs by more than `atol + rtol·|torch|`.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
from torch import nn
from torch.export import Dim
from torch.utils._pytree import MappingKey, tree_flatten_with_path

from compressor.data import Dataset, InputSpec
from compressor.errors import ExportError, VerificationError
from compressor.outputs import call, call_arguments, run_outputs

# onnx's protobuf limit: past this the weights must live in an external data file.
_PROTOBUF_LIMIT = 2 * 1024**3 - 1024**2


# Output values compared in float64 at a time when an export is verified.
_ELEMENTS_PER_CHUNK = 1 << 22

def dynamic_shapes(specs: list[InputSpec]) -> dict[str, dict[int, object]]:
    """Return torch.export dynamic shapes: a shared `batch` dim 0 within the program's bound,
    other dynamic dims left AUTO."""
    largest = min((spec.batch_max for spec in specs if spec.batch_max), default=2**20)
    batch = Dim("batch", min=1, max=min(2**20, largest))
    return {spec.name: {i: (batch if i == 0 else Dim.AUTO)
                        for i, size in enumerate(spec.shape) if size is None or i == 0}
            for spec in specs}


def output_names(count: int) -> list[str]:
    """Return the ONNX names of a model's outputs: output_0, output_1, ..."""
    return [f"output_{i}" for i in range(count)]


def named_outputs(module: nn.Module, sample: dict[str, torch.Tensor]) -> list[str]:
    """Return the ONNX names of the module's outputs: a dict's keys, else `output_names`."""
    return onnx_output_names(call(module, sample))


def onnx_output_names(raw_outputs: object) -> list[str]:
    """Return the ONNX names of a module's raw outputs: a dict's keys, else `output_names`."""
    leaves, _ = tree_flatten_with_path(raw_outputs)
    paths = [path for path, leaf in leaves if isinstance(leaf, torch.Tensor)]
    keys = [path[0].key if len(path) == 1 and isinstance(path[0], MappingKey) else None
            for path in paths]
    if all(isinstance(k, str) and k for k in keys) and len(set(keys)) == len(keys):
        return keys
    return output_names(len(paths))


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
    scratch = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    tmp = scratch / path.name
    quiet = io.StringIO()
    try:
        with torch.no_grad(), contextlib.redirect_stdout(quiet), _exporter_logs_quiet():
            args, kwargs = call_arguments(module, sample)
            program = torch.onnx.export(
                module, args, kwargs=kwargs, dynamo=True, opset_version=opset,
                dynamic_shapes=dynamic_shapes(specs),
                output_names=named_outputs(module, sample),
                optimize=False, verbose=False, report=False)
            weights = list(program.model.graph.initializers.values())
            if optimize:
                program.optimize()
        _strip_debug_metadata(program.model)
        size = sum(int(t.numel() * t.element_size()) for t in module.state_dict().values())
        if size > _PROTOBUF_LIMIT:
            program.save(tmp, external_data=True)
        else:
            save_single_file(program.model, tmp)
        _release_weights(program.model, weights)
        del program, weights
        move_onnx(tmp, path)
    except Exception as exc:  # the exporter raises many types; all mean the same to the user
        shutil.rmtree(scratch, ignore_errors=True)
        reason = _exporter_reason(exc)
        raise ExportError(
            f"the model could not be exported to ONNX (opset {opset}): {reason}. Try "
            "export.form='dense', another export.opset, or check that the program runs with "
            "torch.onnx.export on its own") from exc
    shutil.rmtree(scratch, ignore_errors=True)


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
    file name, so the model still finds its data. The data file moves first."""
    if source.name != target.name:
        raise ValueError(f"an ONNX model with external data keeps its name: {source} -> {target}")
    data_file(target).unlink(missing_ok=True)
    if data_file(source).is_file():
        os.replace(data_file(source), data_file(target))
    os.replace(source, target)


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
    for value in [*exported, *model.graph.initializers.values()]:
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


@contextlib.contextmanager
def _exporter_logs_quiet():
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def onnx_session(path: Path, threads: int | None = None, *,
                 prepack: bool = True) -> ort.InferenceSession:
    """Return an onnxruntime CPU session for the model at `path`.

    `prepack=False` keeps onnxruntime from laying out a second copy of the weights for its
    matrix kernels (half the model's bytes again, measured): slower runs, for checking outputs
    rather than timing them.
    """
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_onnx(session: ort.InferenceSession, batch: dict[str, torch.Tensor]) -> list[np.ndarray]:
    """Run the session on a batch of named torch inputs."""
    wanted = {i.name for i in session.get_inputs()}
    return session.run(None, {k: v.cpu().numpy() for k, v in batch.items() if k in wanted})


@dataclass
class TorchOutputs:
    """The compressed PyTorch model's outputs on the verification samples, computed once, so
    onnxruntime is checked after the PyTorch model has been freed: batch 1, then the rest."""

    batches: list[dict[str, torch.Tensor]]
    outputs: list[list[np.ndarray]]

    @property
    def samples(self) -> int:
        return sum(len(o[0]) if o and o[0].shape else 1 for o in self.outputs)


def torch_outputs(module: nn.Module, held_out: Dataset, max_samples: int = 64,
                  batch_size: int | None = None) -> TorchOutputs:
    """Run `module` on up to `max_samples` held-out rows: at batch 1, then the rest (in batches
    of `batch_size` when given)."""
    rows = torch.arange(min(len(held_out), max_samples))
    rest = rows[1:]
    step = max(1, len(rest) if batch_size is None else batch_size)
    batches = [held_out.take(rows[:1])] + [held_out.take(rest[i:i + step])
                                           for i in range(0, len(rest), step)]
    with torch.no_grad():
        outputs = [[t.numpy() for t in run_outputs(module, batch)] for batch in batches]
    return TorchOutputs(batches, outputs)


def _paired_outputs(path: Path, reference: TorchOutputs):
    """Run onnxruntime on the reference batches; yield (output name, PyTorch's value,
    onnxruntime's value) for every output of every batch. Raises `VerificationError` when the
    shapes differ."""
    session = onnx_session(path, prepack=False)
    names = [output.name for output in session.get_outputs()]
    for batch, expected in zip(reference.batches, reference.outputs, strict=True):
        actual = run_onnx(session, batch)
        for name, want, got in zip(names, expected, actual, strict=True):
            if want.shape != got.shape:
                raise VerificationError(
                    f"onnxruntime output {name} has shape {got.shape}, PyTorch {want.shape} "
                    f"(batch {want.shape[0] if want.shape else 1})")
            yield name, want, got


def _float64_chunks(want: np.ndarray, got: np.ndarray):
    """Yield both arrays' values as float64, `_ELEMENTS_PER_CHUNK` at a time (a decoder's
    logits are never copied whole)."""
    want, got = want.reshape(-1), got.reshape(-1)
    for start in range(0, want.size, _ELEMENTS_PER_CHUNK):
        stop = start + _ELEMENTS_PER_CHUNK
        yield want[start:stop].astype(np.float64), got[start:stop].astype(np.float64)


def differences(want: np.ndarray, got: np.ndarray, atol: float, rtol: float,
                ) -> tuple[float, float]:
    """Return max |got − want| and the max of |got − want| − (atol + rtol·|want|) (positive:
    out of tolerance), in float64 a chunk at a time (`_float64_chunks`). A NaN anywhere makes
    both NaN."""
    worst_abs, worst_excess = 0.0, -np.inf
    for expected, actual in _float64_chunks(want, got):
        diff = np.abs(actual - expected)
        excess = diff - (atol + rtol * np.abs(expected))
        # np.maximum, not max(): a NaN must not lose to the figure so far
        worst_abs = float(np.maximum(worst_abs, diff.max(initial=0.0)))
        worst_excess = float(np.maximum(worst_excess, excess.max(initial=-np.inf)))
    return worst_abs, worst_excess


def verify_onnx(path: Path, reference: TorchOutputs, atol: float, rtol: float) -> dict:
    """Check onnxruntime against the PyTorch outputs `reference`; return the parity figures.

    Raises `VerificationError` naming the output and the worst difference on a mismatch.
    """
    worst_abs: dict[str, float] = {}  # output -> max |onnx - torch|
    worst_excess: dict[str, float] = {}  # output -> max of |diff| - (atol + rtol·|torch|)
    for i, want, got in _paired_outputs(path, reference):
        batch_abs, batch_excess = differences(want, got, atol, rtol)
        worst_abs[i] = float(np.maximum(worst_abs.get(i, 0.0), batch_abs))
        worst_excess[i] = float(np.maximum(worst_excess.get(i, -np.inf), batch_excess))
    for i, excess in worst_excess.items():
        if excess > 0 or not np.isfinite(worst_abs[i]):
            raise VerificationError(
                f"onnxruntime and PyTorch disagree on output {i}: max |difference| "
                f"{worst_abs[i]:.3g} exceeds atol={atol:g} + rtol={rtol:g}·|value|. The artifact "
                "was not kept; raise export.atol / export.rtol if this precision is acceptable, "
                "or try export.form='dense'")
    return {"passed": True, "samples": reference.samples, "atol": atol, "rtol": rtol,
            "max_abs_diff": worst_abs}


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


def onnx_outputs(path: Path, dataset: Dataset, batch_size: int = 64) -> list[list[np.ndarray]]:
    """Return onnxruntime's outputs on every batch of `dataset` (batches of `batch_size`)."""
    session = onnx_session(path, prepack=False)
    return [run_onnx(session, batch) for batch in dataset.batches(batch_size)]


def verify_quantized(path: Path, reference: TorchOutputs, tolerance: float) -> dict:
    """Check an int8 ONNX model against the outputs `reference` of the float PyTorch model it
    was made from.

    int8 cannot match to float tolerances; what it must do is stay close: each float output's
    relative L2 difference (‖onnx − torch‖ / ‖torch‖ over the samples) at most `tolerance`.
    Raises `VerificationError` otherwise.
    """
    squared: dict[str, list[float]] = {}  # output -> [‖onnx − torch‖², ‖torch‖²]
    for name, want, got in _paired_outputs(path, reference):
        if not np.issubdtype(want.dtype, np.floating):
            continue
        sums = squared.setdefault(name, [0.0, 0.0])
        for expected, actual in _float64_chunks(want, got):
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
