"""Objective latency: a layer is exported factorized only where that was measured faster."""

from dataclasses import replace

import onnx
import pytest
import torch

from compressor.config import CompressionConfig
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.search.layer_forms import LayerForms, layer_rows
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2


class Timer:
    """onnxruntime as the test says it runs: the dense weight in `dense_ms`, the two factors
    in 1 ms plus 0.1 ms a rank; every probe model it is asked to time is recorded, and how many
    were timed together (in turn)."""

    def __init__(self, dense_ms: float) -> None:
        self.dense_ms = dense_ms
        self.timed: list[tuple[int, ...]] = []
        self.together: list[int] = []

    def __call__(self, paths, batch) -> dict[str, float]:
        self.together.append(len(paths))
        return {name: self._ms(path, batch) for name, path in paths.items()}

    def _ms(self, path, batch) -> float:
        weights = [tuple(w.dims) for w in onnx.load(path).graph.initializer if len(w.dims) == 2]
        self.timed.append((batch["x"].shape[0], *weights[0], len(weights)))
        return self.dense_ms if len(weights) == 1 else 1.0 + 0.1 * weights[0][1]


@pytest.fixture
def text_plan(tmp_path):
    """The tiny text encoder's plan with its FFN projections (32 -> 128 -> 32) and query
    compressed at chosen ranks, and its layers' rows on a batch of 3 × 8 tokens."""
    teacher = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    plan = plan_layers(*find_layers(teacher),
                       CompressionConfig.parse({"ratio": 0.5, "min_layer_params": 0}))
    ranks = {"mlp_in": 24, "mlp_out": 8, "query": 12}
    layers = tuple(replace(p, size=ranks[p.layer.name]) if p.layer.name in ranks
                   else replace(p, size=None) for p in plan.layers)
    batch = example_inputs(MODEL_CLASSES["text"](), batch=3)
    return replace(plan, layers=layers), layer_rows(teacher, [p.layer for p in layers], batch)


def test_a_layer_is_exported_dense_at_or_above_its_measured_break_even_rank(text_plan):
    plan, rows = text_plan
    assert rows["mlp_in"] == rows["query"] == 3 * example_inputs(
        MODEL_CLASSES["text"](), batch=1)["input_ids"].shape[1]
    timer = Timer(dense_ms=3.0)  # factorized is faster below rank 20, whatever the shape
    forms = LayerForms(rows, timer)
    measured = forms.measured(plan, None)
    assert measured.dense_exports == {"mlp_in"}  # rank 24; mlp_out (8) and query (12) stay
    assert forms.break_even == {(rows["mlp_in"], 32, 128, None): pytest.approx(20.0),
                                (rows["mlp_out"], 128, 32, None): pytest.approx(20.0),
                                (rows["query"], 32, 32, None): pytest.approx(20.0)}
    # each shape timed once, dense and at three ranks in turn, on its layer's rows
    assert len(timer.timed) == 3 * 4 and timer.together == [4, 4, 4]
    assert (rows["mlp_in"], 32, 128, 1) in timer.timed  # the dense weight of mlp_in
    forms.measured(plan, None)
    assert len(timer.timed) == 12  # measured once for every plan
    assert forms.measured(plan, "int4") is plan  # int4 is not measured


def test_where_two_factors_always_run_faster_every_layer_stays_factorized(text_plan):
    plan, rows = text_plan
    measured = LayerForms(rows, Timer(dense_ms=100.0)).measured(plan, None)
    assert measured is plan and not measured.dense_exports


def test_int8_candidates_are_timed_as_int8_models(text_plan):
    plan, rows = text_plan
    ops = []

    def timer(paths, batch):
        ops.extend({node.op_type for node in onnx.load(path).graph.node}
                   for path in paths.values())
        return dict.fromkeys(paths, 1.0)

    LayerForms(rows, timer).measured(plan, "int8")
    assert ops and all("MatMul" not in found for found in ops)  # quantized, every one
