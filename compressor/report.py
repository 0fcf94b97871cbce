"""The figures of report.json: sizes, FLOPs, per-layer errors, latency, versions, hashes."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path

import onnx
import onnxruntime as ort
import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from compressor.export import onnx_session, run_onnx
from compressor.graph import add_product_, layer_rows, run_recording
from compressor.outputs import OutputFidelity, call
from compressor.planning import Plan
from compressor.vocabulary import sha256_of as sha256_of  # the artifacts' hashes in the report


def count_parameters(module: nn.Module) -> int:
    """Return the number of parameter and buffer elements `module` stores."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() for t in tensors)


# Rows of a weight taken to float64 at a time.
_ROWS_PER_CHUNK = 4096


def count_flops(module: nn.Module, batch: dict[str, torch.Tensor]) -> int:
    """Return the FLOPs of one forward pass of `module` on `batch`."""
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        call(module, batch)
    return int(counter.get_total_flops())


def tensor_bytes(module: nn.Module) -> int:
    """Return the bytes of `module`'s parameters and buffers (each tensor counted once)."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def layer_errors(original: fx.GraphModule, compressed: nn.Module, plan: Plan,
                 batch: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Return each compressed layer's relative weight error and relative output error.

    The output error is measured on the inputs the ORIGINAL model feeds that layer on `batch`:
    ‖X (W' − W)ᵀ‖ / ‖X Wᵀ‖, computed from the Gram matrix G = XᵀX, a chunk of W's rows at a
    time (no output rows are formed: a decoder's output layer would need two float64 copies of
    its logits, and its W alone is 200 MB in float64).
    """
    layers = [entry.layer for entry in plan.compressed]
    errors: dict[str, dict[str, float]] = {}

    def record(layer, x: torch.Tensor) -> None:
        dense = original.get_submodule(layer.name).weight.detach()
        approx = compressed.get_submodule(layer.name).weight.detach()
        dense, approx = dense.reshape(dense.shape[0], -1), approx.reshape(dense.shape[0], -1)
        if layer.kind == "embedding":  # each row weighs as often as the batch reads it
            reads = torch.bincount(x.reshape(-1).to(torch.int64), minlength=dense.shape[0])
            weight = reads.double()[:, None]
            gram = None
        else:
            rows = layer_rows(layer, x)
            gram = add_product_(torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64),
                                rows, rows)
        sums = torch.zeros(2, dtype=torch.float64)  # ‖W' − W‖², ‖W‖²
        outputs = torch.zeros(2, dtype=torch.float64)  # ‖X (W' − W)ᵀ‖², ‖X Wᵀ‖²
        for start in range(0, dense.shape[0], _ROWS_PER_CHUNK):  # float64 a chunk at a time
            w = dense[start:start + _ROWS_PER_CHUNK].double()
            difference = approx[start:start + _ROWS_PER_CHUNK].double() - w
            sums[0] += difference.pow(2).sum()
            sums[1] += w.pow(2).sum()
            if gram is None:
                rows_read = weight[start:start + _ROWS_PER_CHUNK]
                outputs[0] += (difference.pow(2) * rows_read).sum()
                outputs[1] += (w.pow(2) * rows_read).sum()
            else:
                outputs[0] += ((difference @ gram) * difference).sum()
                outputs[1] += ((w @ gram) * w).sum()
        errors[layer.name] = {
            "relative_weight_error": float(sums[0].sqrt() / sums[1].sqrt().clamp(min=1e-30)),
            "relative_output_error": float(outputs[0].clamp(min=0).sqrt()
                                           / outputs[1].sqrt().clamp(min=1e-30)),
        }

    with torch.no_grad():
        run_recording(original, layers, batch, record)
    return errors


def fidelity_dict(fidelity: list[OutputFidelity], names: list[str]) -> dict[str, dict]:
    """Return per-output fidelity as plain data, keyed by ONNX output name."""
    return {name: {k: v for k, v in vars(f).items() if v is not None}
            for name, f in zip(names, fidelity, strict=True)}


def onnx_latency_ms(path: Path, batch: dict[str, torch.Tensor], budget_s: float = 1.0,
                    min_runs: int = 5) -> float:
    """Return the median onnxruntime CPU latency (ms) of one run on `batch`.

    Runs for `budget_s` after a warm-up, at least once, and at least `min_runs` times unless
    that passes twice the budget (a large model's run can take a minute).
    """
    session = onnx_session(path)
    run_onnx(session, batch)  # warm-up
    timings, deadline = [], time.perf_counter() + budget_s
    while (not timings or time.perf_counter() < deadline
           or (len(timings) < min_runs and time.perf_counter() < deadline + budget_s)):
        start = time.perf_counter()
        run_onnx(session, batch)
        timings.append((time.perf_counter() - start) * 1000)
        if len(timings) >= 1000:
            break
    return statistics.median(timings)


def onnx_initializer_numel(path: Path) -> int:
    """Return the number of elements stored as initializers in the ONNX model at `path`."""
    model = onnx.load(str(path), load_external_data=False)
    total = 0
    for init in model.graph.initializer:
        count = 1
        for dim in init.dims:
            count *= dim
        total += count
    return total


def versions() -> dict[str, str]:
    """Return the versions of the libraries that shaped the artifact."""
    from compressor import __version__

    return {"compressor": __version__, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": ort.__version__}


def write_json_atomic(path: Path, payload: dict) -> None:
    """Write `payload` as JSON to `path` via a temp file and a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False, default=str))
    os.replace(tmp, path)
