"""Report figures: each layer's errors, computed from input moments, match the direct ones; latency
timed in turn, and a speed difference within timing noise reported as one."""

import copy
from pathlib import Path
from types import SimpleNamespace

import torch

from compressor.config import CompressionConfig, TargetConfig
from compressor.finetune.layer_errors import layer_errors
from compressor.load.data import Dataset
from compressor.plan.layers import find_layers, run_recording
from compressor.plan.planning import plan_layers
from compressor.report import figures
from compressor.report.figures import Timing, onnx_latencies_ms
from compressor.report.stage import latency_figures, outcome_of
from compressor.rewrite.parametrize import parametrize_
from compressor.runtime import memory
from compressor.runtime.budget import LATENCY_MIN_RUNS
from compressor.runtime.costs import SampleCosts
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2


def test_layer_output_errors_equal_those_of_the_output_rows(tmp_path):
    teacher = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2"))).module()
    config = CompressionConfig.parse({"ratio": 0.4, "min_layer_params": 0,
                                      "allocation": "uniform", "method": "lowrank"})
    plan = plan_layers(*find_layers(teacher), config)
    student = copy.deepcopy(teacher)
    parametrize_(student, plan, {}, config.finetune.grad_reduction)
    batch = example_inputs(MODEL_CLASSES["text"](), batch=6, seed=2)
    errors = layer_errors(teacher, student, plan, batch)

    direct = {}

    def record(layer, x):
        dense = teacher.get_submodule(layer.name).weight.detach().double()
        approx = student.get_submodule(layer.name).weight.detach().double()
        if layer.kind == "embedding":
            ids = x.reshape(-1)
            ref, out = dense[ids], approx[ids]
        else:
            rows = layer.spec.input_rows(layer, x.double())
            ref = rows @ dense.reshape(dense.shape[0], -1).T
            out = rows @ approx.reshape(approx.shape[0], -1).T
        direct[layer.name] = float((out - ref).norm() / ref.norm())

    with torch.no_grad():
        run_recording(teacher, [p.layer for p in plan.compressed], batch, record)
    assert set(errors) == set(direct) and any(p.layer.kind == "embedding" for p in plan.compressed)
    for name, error in direct.items():
        assert abs(errors[name]["relative_output_error"] - error) < 1e-9 * max(1.0, error)


def _latency_measurement(original: list[float], compressed: list[float]) -> dict:
    """What latency_figures measures, for an original and an artifact whose batch-32 runs'
    medians and quartiles are given as [first quartile, median, third quartile]."""
    return {"onnx_bytes": {"original": 1000, "artifact": 100},
            "latency": {"original": {"batch_32_ms": original[1]},
                        "compressed": {"batch_32_ms": compressed[1]},
                        "quartiles": {"original": {"batch_32_ms": original[::2]},
                                      "compressed": {"batch_32_ms": compressed[::2]}}}}


def test_an_artifact_slower_within_timing_noise_is_called_as_fast_and_not_warned_of():
    tie = outcome_of(_latency_measurement([0.43, 0.44, 0.46], [0.44, 0.46, 0.49]), {}, {}, None)
    assert tie["speedup"]["within_noise"] is True
    assert "as fast as the original" in tie["headline"] and "slower" not in tie["headline"]
    assert not any("slower" in warning for warning in tie["warnings"])

    slower = outcome_of(_latency_measurement([0.43, 0.44, 0.45], [0.47, 0.49, 0.51]), {}, {},
                        None)
    assert slower["speedup"]["within_noise"] is False
    assert "1.11× slower" in slower["headline"]
    assert any("slower than the original" in warning for warning in slower["warnings"])

    faster = outcome_of(_latency_measurement([0.43, 0.44, 0.45], [0.20, 0.22, 0.23]), {}, {},
                        None)
    assert "2.00× faster" in faster["headline"] and not faster["warnings"]


def test_files_timed_in_turn_each_get_a_median_within_their_quartiles(tmp_path):
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 256])],
        [helper.make_tensor("w", TensorProto.FLOAT, [256, 256], [0.5] * 256 * 256)])
    path = tmp_path / "matmul.onnx"
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))

    timings = onnx_latencies_ms({"a": path, "b": path}, {"x": torch.ones(64, 256)},
                                budget_s=0.05)
    assert set(timings) == {"a", "b"}
    for timing in timings.values():
        first, third = timing.quartiles
        assert 0 < first <= timing.median <= third
    # a budget too short for more than a run or two still gives each file `min_runs` runs
    timings = onnx_latencies_ms({"a": path, "b": path}, {"x": torch.ones(64, 256)},
                                budget_s=1e-4, min_runs=25, longest_s=60)
    assert min(timing.runs for timing in timings.values()) >= 25
    assert Timing(1.0, (0.9, 1.1)).overlaps(Timing(1.2, (1.05, 1.3)))
    assert not Timing(1.0, (0.9, 1.1)).overlaps(Timing(1.3, (1.15, 1.4)))


def test_files_timed_in_pairs_are_scaled_by_the_bar_in_their_own_pair(monkeypatch):
    # the bar read 10 ms in its first pair and 20 in the second (the machine got busier): the
    # second file's 30 ms then count as 15
    pairs = iter([{"bar": Timing(10.0, (9.0, 11.0)), "a": Timing(12.0, (11.0, 13.0))},
                  {"bar": Timing(20.0, (18.0, 22.0)), "b": Timing(30.0, (28.0, 32.0))}])
    opened = []

    def timed(paths, batch, *timing):
        opened.append(list(paths))
        return next(pairs)

    monkeypatch.setattr(figures, "onnx_latencies_ms", timed)
    timings = figures.onnx_latencies_in_pairs(
        "bar", {"a": Path("a"), "bar": Path("bar"), "b": Path("b")}, {})
    assert opened == [["bar", "a"], ["bar", "b"]]  # two sessions open at a time, never three
    assert timings == {"bar": Timing(10.0, (9.0, 11.0)), "a": Timing(12.0, (11.0, 13.0)),
                       "b": Timing(15.0, (14.0, 16.0))}


def test_the_report_times_files_in_pairs_when_their_sessions_do_not_fit_at_once(
        tmp_path, monkeypatch):
    from onnx import TensorProto, helper, save

    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])], "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])])
    paths = {}
    for name in ("original", "artifact", "int8"):
        paths[name] = tmp_path / f"{name}.onnx"
        save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
             str(paths[name]))
    held_out = Dataset({"x": torch.ones(4, 8)}, False, "test")
    costs = SampleCosts(flops_per_sample=8, activation_bytes_per_sample=32, model_bytes=0)

    def measured():
        return latency_figures(paths["original"], held_out, paths["artifact"], 0.02, costs,
                               {"baseline": paths["int8"]})

    opened = []
    timing = figures.onnx_latencies_ms
    monkeypatch.setattr(figures, "onnx_latencies_ms",
                        lambda p, *args: opened.append(len(p)) or timing(p, *args))
    together = measured()["latency"]
    assert together["timed"] == "in turn, every file's session open at once"
    assert set(opened) == {3}
    opened.clear()
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 16)  # bytes
    paired = measured()["latency"]
    assert paired["timed"].startswith("in pairs, each file in turn with the artifact")
    assert set(opened) == {2}
    for latency in (together, paired):
        assert set(latency["quartiles"]) == {"original", "compressed", "baseline"}
        assert all(latency[name]["batch_1_ms"] > 0 for name in latency["quartiles"])
        assert all(latency["runs"][name]["batch_1_ms"] >= LATENCY_MIN_RUNS
                   for name in latency["quartiles"])


def test_a_target_met_with_nothing_measured_against_the_original_reads_as_a_sentence():
    measured = {"onnx_bytes": {"original": None, "artifact": 100},
                "latency": {"original": {}, "compressed": {}}}
    fidelity = {"logits": {"kind": "logits", "perplexity": 31.947,
                           "original_perplexity": 31.931, "next_tokens": 1821}}
    found = SimpleNamespace(target=TargetConfig())
    outcome = outcome_of(measured, fidelity, {}, found)
    assert outcome["headline"].startswith("the artifact meets the target (logits perplexity")
    assert outcome["meets_target"]
    assert outcome_of(measured, fidelity, {}, None)["headline"] == "the artifact is verified"


def _with_int8_baseline(measured: dict, runs: list[float], size: int, cosine: float) -> tuple:
    """`measured` with onnxruntime int8 of the original timed beside it (batch-32 runs as
    [first quartile, median, third quartile]) at `size` bytes and `cosine`; and its figures."""
    measured["latency"]["baseline"] = {"batch_32_ms": runs[1]}
    measured["latency"]["quartiles"]["baseline"] = {"batch_32_ms": runs[::2]}
    baseline = {"onnx_bytes": size, "latency": measured["latency"]["baseline"],
                "fidelity": {"output_0": {"kind": "embedding", "cosine": cosine}}}
    return measured, {"baseline": baseline}


def test_the_headline_gives_the_baselines_speed_and_warns_when_one_beats_the_objective():
    artifact = {"output_0": {"kind": "embedding", "cosine": 0.9913}}
    measured, baselines = _with_int8_baseline(
        _latency_measurement([0.43, 0.44, 0.45], [0.20, 0.22, 0.23]), [0.15, 0.16, 0.17],
        size=115, cosine=0.9925)
    by_size = SimpleNamespace(target=TargetConfig(cosine=0.99))
    outcome = outcome_of(measured, artifact, baselines, by_size)
    assert outcome["headline"].endswith(
        "; onnxruntime int8 of the original: 8.70× smaller, 2.75× faster, "
        "output_0 cosine 0.9925")
    assert not outcome["warnings"]  # the artifact is smaller: it wins on the objective

    by_latency = SimpleNamespace(target=TargetConfig(cosine=0.99, objective="latency"))
    [warning] = outcome_of(measured, artifact, baselines, by_latency)["warnings"]
    assert warning == ("onnxruntime int8 of the original also keeps the target's floors and is "
                       "faster than the artifact at batch 32 (0.16 against 0.22 ms, beyond "
                       "timing noise)")
    # within timing noise, or under the floor, it beats nothing
    measured, baselines = _with_int8_baseline(
        _latency_measurement([0.43, 0.44, 0.45], [0.20, 0.22, 0.23]), [0.19, 0.21, 0.225],
        size=90, cosine=0.9925)
    assert not outcome_of(measured, artifact, baselines, by_latency)["warnings"]
    [warning] = outcome_of(measured, artifact, baselines, by_size)["warnings"]
    assert warning == ("onnxruntime int8 of the original also keeps the target's floors and is "
                       "smaller than the artifact by more than 2% (90 against 100 bytes)")
    # as small as the artifact within the search's 2 %: no warning either
    baselines["baseline"]["onnx_bytes"] = 99
    assert not outcome_of(measured, artifact, baselines, by_size)["warnings"]
    baselines["baseline"]["onnx_bytes"] = 90
    baselines["baseline"]["fidelity"]["output_0"]["cosine"] = 0.98
    assert not outcome_of(measured, artifact, baselines, by_size)["warnings"]
    assert not outcome_of(measured, artifact, baselines, None)["warnings"]  # no target
