"""int8 smoothing: the same model in float, with its activations' outlier channels in the weights."""

import torch
from torch import nn

from compressor.export.onnx import export_onnx
from compressor.export.quantize import quantize_int8
from compressor.export.smoothing import smoothed_for_int8
from compressor.export.verify import onnx_session, run_onnx
from compressor.finetune.quantization_aware import SimulatedInt8
from compressor.load.data import InputSpec
from compressor.runtime.graph import shallow_copy
from compressor.runtime.outputs import run_outputs


class Outliers(nn.Module):
    """Two Linear layers reading one input whose channel 0 is 100 times the others (as a
    transformer's LayerNorm outputs are), then a third reading their sum, and one Linear used
    twice (a shared layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(16, 32)
        self.second = nn.Linear(16, 32)
        self.out = nn.Linear(32, 8)
        self.shared = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * torch.cat([torch.full((1,), 100.0), torch.ones(15)])
        h = self.out(torch.relu(self.first(x)) + self.second(x))
        return self.shared(self.shared(h))


def _module_and_batch():
    torch.manual_seed(0)
    x = torch.randn(32, 10, 16)
    program = torch.export.export(Outliers().eval(), (x,))
    return shallow_copy(program.module()).eval(), {"x": x}  # as the pipeline holds it


def _relative_l2(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def test_the_smoothed_model_computes_the_same_and_loses_less_to_int8(tmp_path):
    module, batch = _module_and_batch()
    smoothed = smoothed_for_int8(module, [batch], alpha=0.5)
    with torch.no_grad():
        reference = run_outputs(module, batch)[0]
        assert _relative_l2(run_outputs(smoothed, batch)[0], reference) < 1e-6
        assert torch.equal(run_outputs(module, batch)[0], reference)  # left as it was
    spec = [InputSpec("x", (None, 10, 16), torch.float32, example_shape=(32, 10, 16))]
    errors = {}
    for name, model in (("plain", module), ("smoothed", smoothed)):
        export_onnx(model, batch, spec, tmp_path / f"{name}.onnx", 18)
        quantize_int8(tmp_path / f"{name}.onnx", tmp_path / f"{name}-int8.onnx")
        int8 = torch.from_numpy(run_onnx(onnx_session(tmp_path / f"{name}-int8.onnx"), batch)[0])
        errors[name] = _relative_l2(int8, reference)
        with torch.no_grad():  # the int8 simulation computes what onnxruntime does, smoothed too
            simulated = run_outputs(SimulatedInt8(model), batch)[0]
        # To 1e-7 on AVX2 without VNNI; with AVX-512 VNNI and AMX, onnxruntime puts a few of
        # the smoothed model's values on the neighbouring int8 level (8 of its 2,560 outputs
        # differ, 6e-4 relative L2): well within a twentieth of what int8 itself costs.
        assert _relative_l2(simulated, int8) < 0.05 * errors[name]
    # 0.032 against 0.045 with 7-bit weights (0.025 against 0.046 with 8-bit ones)
    assert errors["smoothed"] < 0.8 * errors["plain"]


def test_one_division_per_input_worth_it_and_shared_weights_left_alone():
    module, batch = _module_and_batch()
    smoothed = smoothed_for_int8(module, [batch], alpha=0.5)
    divisions = [n for n in smoothed.graph.nodes if n.op == "get_attr"
                 and n.target.startswith("int8_smoothing_")]
    # first and second share one division of x (its int8 error cut to 0.28 of itself); out's
    # input has no outlier channel (smoothing would leave 0.80 of its error: not worth a Mul);
    # shared is read twice
    assert len(divisions) == 1
    for name in ("out", "shared"):
        assert smoothed.get_submodule(name).weight is module.get_submodule(name).weight
    for name in ("first", "second"):
        assert smoothed.get_submodule(name).weight is not module.get_submodule(name).weight
    scale = 1 / getattr(smoothed, divisions[0].target)
    assert scale[0] > 5 * scale[1:].max()  # the outlier channel is divided the most (~√100)


def test_an_input_is_smoothed_only_where_that_cuts_its_int8_error_enough(monkeypatch):
    from compressor.export import smoothing

    module, batch = _module_and_batch()
    uses = smoothing._uses_by_input(module)
    ranges, _ = smoothing._input_ranges(module, uses, [batch])
    scales = {source: smoothing._scale(ranges[source], 0.5) for source in uses}
    errors = smoothing._int8_errors(module, uses, scales, [batch])
    cut = {source.name: smoothed / plain for source, (plain, smoothed) in errors.items()}
    assert cut["mul"] < 0.3 < 0.75 < cut["add"] < 1  # x with its outlier; out's input
    monkeypatch.setattr(smoothing, "WORTH_SMOOTHING", 0.9)  # out's input now worth it too
    smoothed = smoothed_for_int8(module, [batch], alpha=0.5)
    assert smoothed.get_submodule("out").weight is not module.get_submodule("out").weight


def test_measuring_stops_at_the_last_input_smoothed(monkeypatch):
    # what follows the last smoothable input (here `out` and the shared layer; in a language
    # model the vocabulary-wide head) is never computed while measuring
    from compressor.runtime.graph import GraphStepper

    module, batch = _module_and_batch()
    stepped = []
    step = GraphStepper.step
    monkeypatch.setattr(GraphStepper, "step",
                        lambda self, node: (stepped.append(node.name), step(self, node))[1])
    smoothed_for_int8(module, [batch, batch], alpha=0.5)
    names = [node.name for node in module.graph.nodes]
    last_input = names.index("add")  # out's input, the last activation a smoothable layer reads
    assert "add" in stepped and not set(stepped) & set(names[last_input + 1:])


def test_given_factors_are_divided_by_whatever_the_model_now_measures(monkeypatch):
    # a quantization-aware run simulates int8 smoothed by factors measured before it trains;
    # the export then divides by those, not by factors measured on the trained model (which
    # could also smooth other inputs: a different int8 arithmetic from the one θ learned)
    from compressor.export import smoothing

    module, batch = _module_and_batch()
    scales = smoothing.input_scales(module, [batch], alpha=0.5)
    assert set(scales) == {"first.weight", "second.weight"}
    moved = {"x": batch["x"] * torch.linspace(0.5, 3.0, 16)}  # ranges measured anew differ
    monkeypatch.setattr(smoothing, "WORTH_SMOOTHING", float("inf"))  # would smooth `out` too
    smoothed = smoothed_for_int8(module, [moved], alpha=0.5, scales=scales)
    divisions = [n.target for n in smoothed.graph.nodes
                 if n.op == "get_attr" and n.target.startswith("int8_smoothing_")]
    assert len(divisions) == 1
    assert torch.equal(1 / getattr(smoothed, divisions[0]), scales["first.weight"])
    assert smoothed.get_submodule("out").weight is module.get_submodule("out").weight
    assert torch.equal(smoothed.get_submodule("first").weight,
                       module.get_submodule("first").weight * scales["first.weight"])
    measured = smoothed_for_int8(module, [moved], alpha=0.5)
    assert smoothing.divided_inputs(measured) == 2
