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

from compressor.export.verify import onnx_session, run_onnx
from compressor.runtime.outputs import OutputFidelity
from compressor.vocabulary import sha256_of as sha256_of  # the artifacts' hashes in the report


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
