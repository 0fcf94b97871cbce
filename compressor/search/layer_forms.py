"""Objective latency: each compressed layer is exported factorized only where onnxruntime runs
its two matmuls faster than its dense weight, for its shapes (the contract: "each layer's
export form, factorized only where it is measured faster").

Through rank r a layer costs r·(in + out) multiply-adds a row against in·out dense, but
onnxruntime does not run the two at the same speed per multiply-add: near the layer's width the
factorized form is slower (two kernels and an intermediate; with int8, the intermediate
quantized again). For each distinct (rows, in, out) of a plan's compressed matmul layers
(Linear, GPT-2's Conv1D), onnxruntime times the dense MatMul and the two factors' MatMuls at
`PROBE_SHARES` of the break-even rank in·out / (in + out), on random weights and inputs,
quantized as the candidate will be (int8: the product's `quantize_int8`), the four models
timed in turn (`onnx_latencies_ms`: what the machine does meanwhile weighs on all alike). The
factorized timings are close to a line in the rank, so the line through them gives the rank below which
the factorized form is faster. A layer at or above it is exported dense (`Plan.dense_exports`:
W = A @ B made once), as the original's graph runs it. Convolutions, tables
and int4 candidates keep their compact form: they are not measured here.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import fx

from compressor.export.quantize import quantize_int8
from compressor.plan.layers import run_recording
from compressor.plan.planning import Plan
from compressor.report.figures import onnx_latencies_ms
from compressor.runtime.layers import ADDMM, LINEAR, LayerInfo

# Ranks timed for the line, as shares of the rank whose factors hold as many numbers as W.
PROBE_SHARES = (0.25, 0.5, 1.0)
# onnxruntime's timing of each probe model (seconds of runs).
PROBE_SECONDS = 0.2
MATMUL_KINDS = frozenset({LINEAR.name, ADDMM.name})

# (rows, in, out, quantize) -> the rank below which the factorized form is faster
Shape = tuple[int, int, int, str | None]
# times the models (by name) in turn on the batch: each one's median ms, by the same name
Timer = Callable[[dict[str, Path], dict[str, torch.Tensor]], dict[str, float]]


def _timed_ms(paths: dict[str, Path], batch: dict[str, torch.Tensor]) -> dict[str, float]:
    timings = onnx_latencies_ms(paths, batch, PROBE_SECONDS)
    return {name: timing.median for name, timing in timings.items()}


class LayerForms:
    """The break-even ranks measured so far (one timing of each shape serves every plan)."""

    def __init__(self, rows: dict[str, int], timer: Timer | None = None) -> None:
        self.rows = rows  # each layer's input rows at the latency batch
        self.timer = timer or _timed_ms
        self.break_even: dict[Shape, float] = {}

    def measured(self, plan: Plan, quantize: str | None) -> Plan:
        """Return `plan` with its compressed matmul layers whose factorized form is measured
        no faster than their dense weight in `dense_exports` (int4 is not measured)."""
        if quantize == "int4":
            return plan
        dense = frozenset(
            entry.layer.name for entry in plan.compressed
            if entry.method.name == "lowrank" and entry.layer.kind in MATMUL_KINDS
            and entry.layer.name in self.rows
            and entry.size >= self._break_even(entry.layer.name, entry.layer.in_features,
                                               entry.layer.out_features, quantize))
        return plan if dense == plan.dense_exports else replace(plan, dense_exports=dense)

    def _break_even(self, name: str, in_features: int, out_features: int,
                    quantize: str | None) -> float:
        shape = (self.rows[name], in_features, out_features, quantize)
        if shape not in self.break_even:
            self.break_even[shape] = self._measure(*shape)
        return self.break_even[shape]

    def _measure(self, rows: int, in_features: int, out_features: int,
                 quantize: str | None) -> float:
        full = in_features * out_features / (in_features + out_features)
        ranks = sorted({max(1, round(share * full)) for share in PROBE_SHARES})
        generator = torch.Generator().manual_seed(0)
        batch = {"x": torch.randn(rows, in_features, generator=generator)}
        with tempfile.TemporaryDirectory(prefix="layer-forms-") as folder:
            paths = {"dense": self._written(Path(folder), "dense", [(in_features, out_features)],
                                            quantize, generator)}
            for rank in ranks:
                paths[f"rank{rank}"] = self._written(
                    Path(folder), f"rank{rank}", [(in_features, rank), (rank, out_features)],
                    quantize, generator)
            timed = self.timer(paths, batch)
        dense_ms = timed["dense"]
        factorized_ms = [timed[f"rank{rank}"] for rank in ranks]
        slope, intercept = np.polyfit(ranks, factorized_ms, 1) if len(ranks) > 1 else (0.0, 0.0)
        if slope <= 0:  # no measurable cost per rank: faster wherever it is at the smallest
            return float("inf") if min(factorized_ms) < dense_ms else 0.0
        return (dense_ms - intercept) / slope

    @staticmethod
    def _written(folder: Path, name: str, shapes: list[tuple[int, int]], quantize: str | None,
                 generator: torch.Generator) -> Path:
        """Write the probe model of `shapes` (quantized as `quantize` says) to `folder`."""
        path = folder / f"{name}.onnx"
        onnx.save(_matmuls(shapes, generator), path)
        if quantize == "int8":
            quantized = folder / f"{name}-int8.onnx"
            quantize_int8(path, quantized)
            path = quantized
        return path


def _matmuls(shapes: list[tuple[int, int]], generator: torch.Generator) -> onnx.ModelProto:
    """Return a model that multiplies its input `x` by one weight per shape, in turn."""
    nodes, weights, source = [], [], "x"
    for index, (rows, columns) in enumerate(shapes):
        weight = (torch.randn(rows, columns, generator=generator) / rows ** 0.5).numpy()
        weights.append(numpy_helper.from_array(weight, f"w{index}"))
        output = "y" if index == len(shapes) - 1 else f"h{index}"
        nodes.append(helper.make_node("MatMul", [source, f"w{index}"], [output]))
        source = output
    graph = helper.make_graph(
        nodes, "matmuls",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", shapes[0][0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", shapes[-1][1]])],
        weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def layer_rows(teacher: fx.GraphModule, layers: list[LayerInfo],
               batch: dict[str, torch.Tensor]) -> dict[str, int]:
    """Return each of `layers`' input rows when the original runs on `batch` (a Linear's
    tokens)."""
    rows: dict[str, int] = {}

    def record(layer: LayerInfo, x: torch.Tensor) -> None:
        rows[layer.name] = rows.get(layer.name, 0) + layer.spec.input_rows(layer, x).shape[0]

    run_recording(teacher, list(layers), batch, record)
    return rows
