"""Target mode: the smallest candidate that keeps the floor, or `target_not_met` with the best."""

import json
import shutil
import weakref

import onnx
import pytest
import torch
from click.testing import CliRunner

import compressor
from compressor.cli import main
from compressor.config import CompressionConfig, TargetConfig
from compressor.errors import ConfigError, TargetNotMetError
from compressor.export import smoothing
from compressor.finetune import loop as loop_module
from compressor.finetune import stage as finetune_stage
from compressor.finetune.loop import HeldOut
from compressor.load.stage import load
from compressor.plan.stage import calibrate_layers, plan
from compressor.rewrite import stage as rewrite_stage
from compressor.rewrite.kept import CorrectedThetas
from compressor.runtime import memory
from compressor.runtime.context import JobContext
from compressor.runtime.joblog import JobLog
from compressor.runtime.outputs import describe_fidelity
from compressor.runtime.progress import JobControl
from compressor.search import layer_forms
from compressor.search import scout as scout_module
from compressor.search.candidates import (
    KEPT_FRACTIONS,
    SHARED_VALUES,
    Candidate,
    budget_plans,
    latency_costs,
    within_reach,
)
from compressor.search.scout import INT4_TRIES, Scout
from compressor.search.target import _floor_check
from compressor.vocabulary import PLANNING
from tests.support.clock import JobClock
from tests.support.search import unmeasured
from tests.support.tiny_models import make_pt2

# An MLP scored as a regression (relative L2), so floors can be set anywhere; no fine-tuning,
# so a candidate's figures after "fine-tuning" are those it was scored with.
FAST = {"finetune": {"steps": 0, "loss": "regression"}, "min_layer_params": 0,
        "export": {"latency_seconds": 0}, "data": {"synthetic_samples": 64}}


@pytest.fixture(scope="module")
def mlp(tmp_path_factory):
    return make_pt2("mlp", tmp_path_factory.mktemp("mlp") / "mlp.pt2")


@pytest.fixture(scope="module")
def easy(mlp, tmp_path_factory):
    """A target every candidate meets: the search's candidates and what each scored."""
    out = tmp_path_factory.mktemp("easy")
    return compressor.compress(mlp, {**FAST, "target": {"relative_l2": 10.0}}, out_dir=out)


@pytest.fixture(scope="module")
def easy_smoothed(mlp, tmp_path_factory):
    """`easy` with every int8 candidate's inputs smoothed (`_smoothing_everywhere`)."""
    out = tmp_path_factory.mktemp("easy-smoothed")
    with pytest.MonkeyPatch.context() as patch:
        _smoothing_everywhere(patch)
        return compressor.compress(mlp, {**FAST, "target": {"relative_l2": 10.0}}, out_dir=out)


def _smoothing_everywhere(patch) -> None:
    """Smooth every int8 MatMul input, as if each one's smoothing cut its int8 error enough:
    the MLP's inputs have no outlier channel, so none would be (`smoothing.WORTH_SMOOTHING`),
    and int8 from a smoothed copy would be int8 of the model as it is."""
    patch.setattr(smoothing, "WORTH_SMOOTHING", float("inf"))


def _relative_l2(candidate):
    return candidate["fidelity"]["output_0"]["relative_l2"]


def test_an_easy_target_hands_back_the_smallest_candidate(easy):
    search = easy.report["target"]
    assert all(c["meets_floor"] for c in search["candidates"])
    chosen = search["chosen"]
    assert chosen["bytes"] == min(c["bytes"] for c in search["candidates"])
    assert easy.report["onnx_bytes"]["artifact"] == chosen["bytes"]  # what was measured ships
    assert easy.report["config"]["target"]["relative_l2"] == 10.0
    assert easy.report["outcome"]["meets_target"]
    assert not any("not smaller" in warning for warning in easy.report["warnings"])


def test_each_candidate_scored_is_logged_with_the_memory_held_then(easy):
    log = easy.log_path.read_text()
    scored = [line for line in log.splitlines() if "] target: scored " in line]
    assert len(scored) == len(easy.report["target"]["candidates"])
    assert all(", peak of the stage so far " in line and "resident " in line for line in scored)


def test_the_latency_objective_times_every_candidate_in_reach_and_hands_back_the_fastest(
    mlp, tmp_path
):
    target = {"relative_l2": 10.0, "objective": "latency", "latency_batch": 8}
    result = compressor.compress(mlp, {**FAST, "target": target}, out_dir=tmp_path / "out")
    search = result.report["target"]
    assert search["objective"] == "latency"
    # every candidate meets this floor: each was exported and timed, its real bytes measured
    assert all(c["latency_ms"] > 0 and not c["bytes_estimated"] for c in search["candidates"])
    assert search["chosen"]["latency_ms"] == min(c["latency_ms"] for c in search["candidates"])


def test_the_latency_objective_exports_dense_each_layer_measured_no_faster_factorized(
        mlp, tmp_path, monkeypatch):
    # onnxruntime as the test says it runs: a dense weight always faster than two factors
    monkeypatch.setattr(layer_forms, "_timed_ms", lambda paths, batch: {
        name: float(sum(len(w.dims) == 2 for w in onnx.load(path).graph.initializer))
        for name, path in paths.items()})
    target = {"relative_l2": 10.0, "objective": "latency", "latency_batch": 8}
    result = compressor.compress(mlp, {**FAST, "target": target}, out_dir=tmp_path / "out")
    compressed = [c for c in result.report["target"]["candidates"]
                  if c["method"] == "lowrank" and c["kept_fraction"] < 1.0]
    assert compressed and all(c["dense_exports"] for c in compressed if c["quantize"] != "int4")
    # with int8 too every layer is dense: int8 of the original with low-rank weights (as large
    # and as fast as int8 of the original, less faithful) is not scored
    assert not any(c["quantize"] == "int8" for c in compressed)
    assert ("with int8 is not scored: every compressed layer is exported dense with int8"
            in (tmp_path / "out" / "job.log").read_text())
    # a float candidate exported with every layer dense has the original's shapes and bytes
    original = result.report["parameters"]["before"]
    floats = [c for c in compressed if c["quantize"] is None]
    assert floats and all(c["parameters"] == original and not c["bytes_estimated"]
                          for c in floats)
    assert "exported dense: onnxruntime runs them no faster factorized" in (
        tmp_path / "out" / "job.log").read_text()


def _muls(path) -> int:
    return sum(node.op_type == "Mul"
               for node in onnx.load(path, load_external_data=False).graph.node)


def _ops(path) -> set[str]:
    return {node.op_type for node in onnx.load(path, load_external_data=False).graph.node}


def _timed_as(latency_ms, calls=None):
    """Return `Scout._latencies_ms` as onnxruntime runs each file by the test's word
    (`latency_ms(path)`), recording how many files each timing had in `calls`."""
    def latencies_ms(self, paths, seconds):
        if calls is not None:
            calls.append(len(paths))
        return {name: latency_ms(path) for name, path in paths.items()}

    return latencies_ms


def test_the_latency_objective_scores_int8_of_the_original_unsmoothed_and_ships_it_when_fastest(
    mlp, tmp_path, monkeypatch
):
    # timed as its Mul nodes: int8 from a smoothed copy has a Mul more per smoothed input
    _smoothing_everywhere(monkeypatch)
    monkeypatch.setattr(Scout, "_latencies_ms", _timed_as(
        lambda path: float(_muls(path)) if "MatMulInteger" in _ops(path) else 100.0))
    target = {"relative_l2": 10.0, "objective": "latency", "latency_batch": 8}
    result = compressor.compress(mlp, {**FAST, "target": target}, out_dir=tmp_path / "out")
    candidates = result.report["target"]["candidates"]
    originals = {c["unsmoothed"]: c for c in candidates
                 if (c["kept_fraction"], c["quantize"]) == (1.0, "int8")}
    assert set(originals) == {False, True}  # int8 of the original, smoothed and not
    assert not any(c["unsmoothed"] for c in candidates if c["kept_fraction"] < 1.0)
    assert originals[True]["latency_ms"] < originals[False]["latency_ms"]
    chosen = result.report["target"]["chosen"]
    assert chosen["unsmoothed"] and chosen["latency_ms"] == originals[True]["latency_ms"]
    assert _muls(result.model_path) == chosen["latency_ms"]  # what ships is the one timed


def test_int8_of_the_original_is_not_scored_unsmoothed_when_smoothing_divides_nothing(
    mlp, tmp_path, monkeypatch
):
    # the MLP's inputs have no outlier channel: its smoothed int8 is its int8, not scored twice
    monkeypatch.setattr(Scout, "_latencies_ms", _timed_as(lambda path: 1.0))
    target = {"relative_l2": 10.0, "objective": "latency", "latency_batch": 8}
    result = compressor.compress(mlp, {**FAST, "target": target}, out_dir=tmp_path / "out")
    candidates = result.report["target"]["candidates"]
    originals = [c for c in candidates if (c["kept_fraction"], c["quantize"]) == (1.0, "int8")]
    assert [c["unsmoothed"] for c in originals] == [False]
    log = (tmp_path / "out" / "job.log").read_text()
    assert ("target: int8 of the original is not scored unsmoothed too: smoothing divided none "
            "of its inputs, so it is the same model") in log


def test_the_latency_objective_cuts_by_multiply_adds_and_leaves_embedding_tables_dense(tmp_path):
    # A lookup does no multiply-adds: factorizing a table only adds some. Every other layer's
    # numbers are priced by the rows it multiplies on the calibration samples.
    config = CompressionConfig.parse({**FAST, "target": {"objective": "latency"}})
    log = JobLog(tmp_path / "job.log")
    control = JobControl()
    loaded = load(make_pt2("text", tmp_path / "text.pt2"), None, config, tmp_path, control, log)
    job = JobContext(loaded.costs, control, log)
    calibrated = calibrate_layers(loaded, config, job)
    tables = {p.layer.name for p in calibrated.plan.layers if p.layer.kind == "embedding"}
    assert tables and all(p.adjustable for p in calibrated.plan.layers
                          if p.layer.name in tables)  # the size objective would cut them
    plan, costs = latency_costs(calibrated.plan, calibrated.stats, job)
    assert set(costs) == {p.layer.name for p in plan.layers if p.adjustable}
    assert not tables & set(costs)
    assert costs == {name: float(calibrated.stats[name].rows) for name in costs}
    assert all(cost > 0 for cost in costs.values())
    prepared = {name: s.prepared for name, s in calibrated.stats.items() if s.prepared}
    budgets = budget_plans(plan, prepared, dict.fromkeys(prepared, 1.0), costs)
    assert budgets
    total = sum(costs[p.layer.name] * p.layer.numel for p in plan.layers if p.adjustable)
    for fraction, budgeted in budgets:
        assert all(p.size is None and "objective latency" in p.reason
                   for p in budgeted.layers if p.layer.name in tables)
        spent = sum(costs[p.layer.name] * p.compact_numel
                    for p in budgeted.layers if p.layer.name in costs)
        assert spent <= fraction * total * (1 + 1e-9)
        assert budgeted.budget == pytest.approx(budgeted.kept_numel)
    log.close()
    assert (f"target (objective latency): {len(tables)} embedding tables kept dense; budgets "
            "are shares of the targeted layers' multiply-adds") in (
        tmp_path / "job.log").read_text()


def test_the_size_objective_times_the_candidates_exported_that_meet_the_floor(easy):
    # each may tie with another on size (`SIZE_TIE`): timed while its file is at hand (the
    # next test: a floor two candidates meet, and only they are timed)
    candidates = easy.report["target"]["candidates"]  # every one meets this floor
    assert all((c["latency_ms"] is None) == c["bytes_estimated"] for c in candidates)
    assert sum(c["latency_ms"] is not None and c["quantize"] is None
               and c["method"] == "lowrank" for c in candidates) == 1  # the smallest float


def test_a_floor_only_the_largest_budget_meets_picks_it(easy, mlp, tmp_path):
    floats = [c for c in easy.report["target"]["candidates"]
              if c["quantize"] is None and c["method"] == "lowrank"]
    fractions = [c["kept_fraction"] for c in floats]  # scored largest first
    assert fractions == sorted(fractions, reverse=True) and fractions[0] in KEPT_FRACTIONS
    # budgets whose plans come out the same (this model's coarse ranks) are scored once
    assert len({c["parameters"] for c in floats}) == len(floats)
    largest, runner_up = floats[0], floats[1]
    assert _relative_l2(largest) < _relative_l2(runner_up)
    floor = (_relative_l2(largest) + _relative_l2(runner_up)) / 2
    result = compressor.compress(mlp, {**FAST, "target": {"relative_l2": floor}},
                                 out_dir=tmp_path / "out")
    search = result.report["target"]
    met = [c for c in search["candidates"] if c["meets_floor"]]
    scored = [c for c in search["candidates"]
              if c["quantize"] is None and c["method"] == "lowrank"]
    floats = [c["kept_fraction"] for c in scored]
    assert [c["kept_fraction"] for c in met
            if c["quantize"] is None and c["method"] == "lowrank"] == [largest["kept_fraction"]]
    # largest first, down to the first budget beyond fine-tuning's reach: smaller ones only lose
    assert floats == fractions[:len(floats)] and len(floats) >= 2
    assert not within_reach(scored[-1]["fidelity"], TargetConfig(relative_l2=floor))
    assert all(within_reach(c["fidelity"], TargetConfig(relative_l2=floor))
               for c in scored[:-1])
    chosen = search["chosen"]
    assert chosen["kept_fraction"] >= largest["kept_fraction"] and _relative_l2(chosen) <= floor
    assert chosen["bytes"] == min(c["bytes"] for c in met)  # int8 of it, or of the original,
    # when that also keeps the floor and is smaller


def test_int8_of_the_original_is_a_candidate_and_wins_when_nothing_smaller_keeps_the_floor(
        easy, mlp, tmp_path):
    dense = [c for c in easy.report["target"]["candidates"] if c["kept_fraction"] == 1.0]
    assert [c["quantize"] for c in dense] == ["int8", "int4"]
    dense = dense[:1]
    smaller = [c for c in easy.report["target"]["candidates"] if c["bytes"] < dense[0]["bytes"]]
    floor = min(_relative_l2(c) for c in smaller) / 2  # none of them keeps it
    assert _relative_l2(dense[0]) <= floor  # int8 loses far less than any rank cut here
    steps = {**FAST["finetune"], "steps": 20}  # the original's weights: no θ to take them
    result = compressor.compress(mlp, {**FAST, "finetune": steps,
                                       "target": {"relative_l2": floor}},
                                 out_dir=tmp_path / "out")
    chosen = result.report["target"]["chosen"]
    assert (chosen["kept_fraction"], chosen["quantize"]) == (1.0, "int8")
    assert all(entry["method"] == "dense" for entry in result.report["plan"]["layers"])
    [tried] = result.report["target"]["tries"]
    assert tried["fine_tuned"] == "not: it compresses no layer, so it has no θ to train"
    assert tried["steps_run"] == 0
    assert result.report["finetune"]["skipped"] == (
        "fine-tuning skipped: candidate kept 1 int8 compresses no layer, so it has nothing to "
        "train")


def test_a_finalist_shipped_as_scored_ships_the_file_the_search_scored(easy, mlp, tmp_path):
    candidates = easy.report["target"]["candidates"]
    [dense] = [c for c in candidates if c["kept_fraction"] == 1.0 and c["quantize"] == "int8"]
    floor = min(_relative_l2(c) for c in candidates if c["bytes"] < dense["bytes"]) / 2
    result = compressor.compress(mlp, {**FAST, "target": {"relative_l2": floor}},
                                 out_dir=tmp_path / "out")
    chosen = result.report["target"]["chosen"]
    assert (chosen["kept_fraction"], chosen["quantize"]) == (1.0, "int8")  # no θ to train
    log = (tmp_path / "out" / "job.log").read_text()
    assert "exporting: the int8 model as the search scored it (θ unchanged since)" in log
    assert "exporting: quantizing to int8" not in log  # not made a second time
    assert "exporting: smoothing the activations for int8" not in log
    assert result.report["onnx_bytes"]["artifact"] == chosen["bytes"]
    assert result.report["fidelity"]["artifact"]["output_0"]["relative_l2"] == pytest.approx(
        _relative_l2(chosen), rel=1e-6)  # the file scored is the file verified and shipped
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "job.log", "model.onnx", "report.json"]  # nothing of the search's files left


def test_candidates_the_machine_lacks_the_memory_to_score_are_left_out_saying_why(
        mlp, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1024)  # what shortfall reads
    timed = {"latency_seconds": 0.01}  # the original is exported: the baselines are tried
    result = compressor.compress(mlp, {**FAST, "export": timed,
                                       "target": {"relative_l2": 10.0}},
                                 out_dir=tmp_path / "out")
    target = result.report["target"]
    assert {(c["quantize"], c["method"]) for c in target["candidates"]} == {(None, "lowrank")}
    assert target["chosen"]["quantize"] is None
    kinds = [entry.split(": ")[0] for entry in target["not_scored"]]
    assert kinds[0] == "the original with int8"  # the first the walk scores
    assert "the original with int4" in kinds and kinds[-1] == "the shared-values candidate"
    assert any(kind.startswith("the candidate keeping ") for kind in kinds)
    assert all("more memory, and 1.0 KiB is available" in entry for entry in target["not_scored"])
    log = (tmp_path / "out" / "job.log").read_text()
    assert "target: the original with int8 is not scored: scoring the original with int8 needs" in log
    # the report's baselines say why they are missing rather than failing the job
    assert result.report["baseline"]["error"].startswith("int8 quantization of the ")
    assert result.report["baseline_int4"]["error"].endswith(
        "export without export.quantize, or run the job on a machine with more memory")


def test_a_floor_missed_with_candidates_left_out_for_memory_says_so(mlp, tmp_path, monkeypatch):
    monkeypatch.setattr(memory, "available_memory_bytes", lambda: 1024)
    with pytest.raises(TargetNotMetError) as raised:
        compressor.compress(mlp, {**FAST, "target": {"relative_l2": 1e-9}},
                            out_dir=tmp_path / "out")
    assert ". Not scored for lack of memory: the original with int8: " in raised.value.message
    assert raised.value.message.endswith(
        ": run the job on a machine with more memory to let the search weigh them")


def test_shared_values_are_a_candidate_and_win_when_only_they_keep_the_floor(easy, mlp, tmp_path):
    candidates = easy.report["target"]["candidates"]
    [shared] = [c for c in candidates if c["method"] == "share_values"]
    assert shared["quantize"] is None and not shared["bytes_estimated"]  # measured: 1-byte ids
    others = [c for c in candidates if c["method"] != "share_values"]
    assert _relative_l2(shared) < min(_relative_l2(c) for c in others)  # 256 values: near lossless
    floor = (_relative_l2(shared) + min(_relative_l2(c) for c in others)) / 2
    result = compressor.compress(mlp, {**FAST, "target": {"relative_l2": floor}},
                                 out_dir=tmp_path / "out")
    chosen = result.report["target"]["chosen"]
    assert chosen["method"] == "share_values" and _relative_l2(chosen) <= floor
    assert {entry["method"] for entry in result.report["plan"]["layers"]} == {"share_values"}
    assert {entry["size"] for entry in result.report["plan"]["layers"]} == {SHARED_VALUES}
    assert result.report["onnx_bytes"]["artifact"] == chosen["bytes"]  # what was measured ships


@pytest.mark.parametrize("tie", [None, 0.1])
def test_candidates_as_small_as_the_smallest_are_timed_and_the_fastest_ships(
        easy_smoothed, mlp, tmp_path, monkeypatch, tie):
    # int8 of the original and the shared values both keep this floor, the shared values a few
    # per cent larger: as small as each other within a `SIZE_TIE` of 0.1, not within 0.02
    _smoothing_everywhere(monkeypatch)  # int8's bytes as in `easy_smoothed`
    candidates = easy_smoothed.report["target"]["candidates"]
    [int8] = [c for c in candidates if (c["kept_fraction"], c["quantize"]) == (1.0, "int8")]
    [shared] = [c for c in candidates if c["method"] == "share_values"]
    assert 1.02 < shared["bytes"] / int8["bytes"] < 1.1
    floor = 1.25 * max(_relative_l2(int8), _relative_l2(shared))
    assert all(_relative_l2(c) > 2 * floor for c in candidates
               if c["bytes"] < int8["bytes"])  # nothing smaller keeps it, or is within reach
    if tie is not None:
        monkeypatch.setattr(scout_module, "SIZE_TIE", tie)
    timed = []  # the shared values run faster than int8 here
    monkeypatch.setattr(Scout, "_latencies_ms", _timed_as(
        lambda path: 2.0 if "MatMulInteger" in _ops(path) else 1.0, timed))
    result = compressor.compress(mlp, {**FAST, "target": {"relative_l2": floor}},
                                 out_dir=tmp_path / "out")
    search = result.report["target"]
    chosen = search["chosen"]
    log = (tmp_path / "out" / "job.log").read_text()
    # both timed as they were scored, and only they: nothing else meets the floor; then, when
    # as small as each other, timed again in turn, both files open together
    assert timed == [1, 1] + ([] if tie is None else [2])
    assert {c["latency_ms"] for c in search["candidates"] if c["meets_floor"]} == {1.0, 2.0}
    if tie is None:  # 2 %: the smallest ships, slower as it is
        assert (chosen["kept_fraction"], chosen["quantize"], chosen["latency_ms"]) == (
            1.0, "int8", 2.0)
        assert "the fastest is tried first" not in log
        return
    assert chosen["method"] == "share_values" and chosen["latency_ms"] == 1.0
    assert [t["method"] for t in search["tries"]] == ["share_values"]  # tried first, and kept
    assert ("target: 2 candidates meet the floor within 10% of the smallest's bytes; the "
            f"fastest is tried first (timed in turn): shared values ({SHARED_VALUES} a layer) "
            f"({chosen['bytes']:,} bytes, 1 ms), kept 1 int8 ({int8['bytes']:,} bytes, 2 ms)"
            ) in log


def test_int4_candidates_are_scored_on_their_real_int4_models_and_reported(easy):
    candidates = easy.report["target"]["candidates"]
    int8 = {c["kept_fraction"]: c for c in candidates if c["quantize"] == "int8"}
    int4 = [c for c in candidates if c["quantize"] == "int4"]
    assert [c["kept_fraction"] for c in int4][0] == 1.0  # int4 of the original, first
    assert any(c["kept_fraction"] < 1.0 for c in int4)  # stacked on a budget
    assert len(int4) <= INT4_TRIES + 1
    for candidate in int4:
        assert not candidate["bytes_estimated"] and _relative_l2(candidate) > 0
        # where int8 was scored (every int8 meets this floor: so does the first int4, and the
        # walk stops there), and smaller than int8 of the same weights
        assert candidate["bytes"] < int8[candidate["kept_fraction"]]["bytes"]


def test_an_int4_finalist_ships_as_the_real_int4_model(easy):
    import onnx

    search = easy.report["target"]
    chosen = search["chosen"]
    assert chosen["quantize"] == "int4"  # 4-bit weights are the smallest form every one meets
    assert search["export"] == {"form": "factorized", "quantize": "int4"}
    # the original's, here: no θ, so nothing is fine-tuned (one with θ trains in float)
    assert chosen["kept_fraction"] == 1.0
    assert search["tries"][-1]["fine_tuned"] == (
        "not: it compresses no layer, so it has no θ to train")
    ops = {node.op_type for node in onnx.load(str(easy.model_path)).graph.node}
    assert "MatMulNBits" in ops
    assert easy.report["onnx_bytes"]["artifact"] == chosen["bytes"]
    # verified on the artifact itself against the floor, on the held-out split
    assert _relative_l2({"fidelity": easy.report["fidelity"]["artifact"]}) <= 10.0


def test_a_finalists_fine_tuning_ends_at_the_first_evaluation_that_keeps_the_floor(
        easy, mlp, tmp_path):
    candidates = easy.report["target"]["candidates"]
    [shared] = [c for c in candidates if c["method"] == "share_values"]
    others = [c for c in candidates if c["method"] != "share_values"]
    floor = (_relative_l2(shared) + min(_relative_l2(c) for c in others)) / 2  # only it keeps it
    config = {**FAST, "finetune": {"steps": 40, "eval_every": 5, "loss": "regression"},
              "target": {"relative_l2": floor}}
    result = compressor.compress(mlp, config, out_dir=tmp_path / "out")
    tried = result.report["target"]["tries"][-1]
    assert tried["method"] == "share_values" and tried["meets_floor"]
    # it kept the floor as initialized: the first evaluation ends it, with the better θ
    assert tried["floor_kept_at"] == tried["steps_run"] == 5
    assert result.report["finetune"]["steps_run"] == 5
    why = ("the held-out fidelity keeps the floor" if result.report["finetune"]["best_step"]
           else "no step improved on θ as initialized, which keeps the floor")
    assert f"fine-tuning ended at step 5 of 40: {why}" in (
        tmp_path / "out" / "job.log").read_text()


def test_a_finalist_that_kept_the_floor_as_initialized_ends_at_the_first_evaluation_anyway(
        mlp, tmp_path, monkeypatch):
    # steps far too long make θ worse: no evaluation improves on θ as initialized, which
    # already keeps the floor, so fine-tuning ends at the first one and ships it as it was
    _without_the_original_quantized(monkeypatch)  # a compressed candidate is the smallest
    config = {**FAST, "finetune": {"steps": 40, "eval_every": 5, "loss": "regression",
                                   "lr": 1.0},
              "target": {"relative_l2": 10.0}}
    result = compressor.compress(mlp, config, out_dir=tmp_path / "out")
    tried = result.report["target"]["tries"][-1]
    chosen = result.report["target"]["chosen"]
    assert tried["meets_floor"] and tried["floor_kept_at"] == tried["steps_run"] == 5
    assert result.report["finetune"]["best_step"] == 0
    assert tried["fidelity"] == chosen["fidelity"]  # θ as initialized, as it was scored
    assert ("fine-tuning ended at step 5 of 40: no step improved on θ as initialized, which "
            "keeps the floor") in (tmp_path / "out" / "job.log").read_text()


def test_a_finalist_trained_in_float_keeps_the_floor_by_what_its_quantization_took(tmp_path):
    from types import SimpleNamespace

    from compressor.runtime.outputs import OutputFidelity

    def figures(relative_l2):
        return {"output_0": {"kind": "regression", "cosine": 0.9, "relative_l2": relative_l2,
                             "top1_agreement": None}}

    def candidate(quantize, relative_l2, fraction=0.5):
        return Candidate(fraction, quantize, 10, 40, figures(relative_l2), False)

    def student(relative_l2):
        return [OutputFidelity("regression", 0.9, relative_l2, None)]

    target = TargetConfig(relative_l2=0.1)
    loaded = SimpleNamespace(output_names=["output_0"], next_token=[False])
    int8 = candidate("int8", 0.13)  # int8 took 0.05 from the float 0.08
    scored = [candidate(None, 0.08), candidate(None, 0.02, fraction=0.6), int8]
    check = _floor_check(int8, scored, target, loaded, simulated=False)
    assert check.kept(student(0.05)) and not check.kept(student(0.051))
    # trained through the int8 it ships in: its own figures are judged, no margin
    assert _floor_check(int8, scored, target, loaded, simulated=True).kept(student(0.1))
    assert _floor_check(scored[0], scored, target, loaded, simulated=False).kept(student(0.1))
    # then its real quantized model (as θ is now) must keep the floor too (the loop asks once
    # `kept` accepts)
    assert check.shipped is None
    check = _floor_check(int8, scored, target, loaded, simulated=False,
                         shipped=lambda: figures(0.11))
    assert check.kept(student(0.05)) and not check.shipped()
    check = _floor_check(int8, scored, target, loaded, simulated=False,
                         shipped=lambda: figures(0.1))
    assert check.kept(student(0.05)) and check.shipped()
    # no float candidate of that budget was scored: nothing to judge by, every step runs
    assert _floor_check(candidate("int8", 0.13, fraction=0.7), scored, target, loaded,
                        simulated=False) is None


def test_an_unreachable_floor_fails_with_the_best_figures_reached(mlp, tmp_path):
    with pytest.raises(TargetNotMetError) as caught:
        compressor.compress(mlp, {**FAST, "target": {"relative_l2": 1e-9}},
                            out_dir=tmp_path / "out")
    assert caught.value.code == "target_not_met"
    message = caught.value.message
    assert "the best reached output_0 relative L2" in message and "bytes" in message
    assert "`ratio`" in message  # what to try
    assert not (tmp_path / "out" / "model.onnx").exists()
    assert "target_not_met" in (tmp_path / "out" / "job.log").read_text()


def test_a_target_config_reads_back_as_it_was_with_every_default_filled():
    config = CompressionConfig.parse({"target": {"cosine": 0.995}})
    assert CompressionConfig.parse(config.to_dict()) == config  # what the service's workers read
    assert CompressionConfig.parse(config.to_json()).target.cosine == 0.995


def test_an_explicit_ratio_plans_exactly_as_without_a_target(mlp, tmp_path):
    config = CompressionConfig.parse({**FAST, "ratio": 0.4})
    result = compressor.compress(mlp, config, out_dir=tmp_path / "out")
    assert "target" not in result.report
    log = JobLog(None)
    control = JobControl()
    torch.manual_seed(config.finetune.seed)
    (tmp_path / "again").mkdir()
    loaded = load(mlp, None, config, tmp_path / "again", control, log)
    job = JobContext(loaded.costs, control, log)
    planned = plan(loaded, calibrate_layers(loaded, config, job), config, job)
    expected = json.loads(json.dumps(planned.plan.to_dict()))
    got = result.report["plan"]
    assert [(e["name"], e["size"]) for e in got["layers"]] == [
        (e["name"], e["size"]) for e in expected["layers"]]
    assert got["kept_weights"] == expected["kept_weights"]


@pytest.mark.parametrize("config, says", [
    ({"target": {}, "overrides": [{"match": "fc1", "rank": 4}]}, "`overrides`"),
    ({"target": {}, "export": {"quantize": "int8"}}, "export.quantize"),
    ({"target": {}, "export": {"quantize": "int4"}}, "export.quantize"),
    ({"target": {"cosine": 2}}, "target.cosine"),
    ({"target": {"objective": "speed"}}, "target.objective"),
])
def test_a_target_that_cannot_be_followed_is_refused_naming_the_field(config, says):
    with pytest.raises(ConfigError, match=None) as caught:
        CompressionConfig.parse(config)
    assert says in caught.value.message


def test_the_command_line_takes_a_target_and_prints_the_outcome_first(mlp, tmp_path):
    out = tmp_path / "out"
    settings = ["--set", 'target={"relative_l2": 10}', "--set", "finetune.steps=0",
                "--set", 'finetune.loss="regression"', "--set", "min_layer_params=0",
                "--set", "export.latency_seconds=0.05"]
    result = CliRunner().invoke(main, ["compress", str(mlp), "--out", str(out), *settings])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    said = " ".join(result.output.split())
    assert said.index("smaller") < said.index("compression summary")  # the headline first
    assert report["target"]["chosen"]["meets_floor"] and report["outcome"]["meets_target"]
    # the baselines a user would pick instead, measured in the same job on the same inputs
    for key, quantize in (("baseline", "int8"), ("baseline_int4", "int4")):
        baseline = report[key]
        assert quantize in baseline["what"] and baseline["onnx_bytes"] > 0
        assert baseline["onnx_bytes"] < report["onnx_bytes"]["original"]
        assert set(baseline["latency"]) == set(report["latency"]["original"])
        assert 0 < baseline["fidelity"]["output_0"]["relative_l2"] < 1
        assert f"onnxruntime {quantize} of the original" in said
    # two different models, each scored: which costs more depends on the CPU (onnxruntime's
    # default int8 saturates on x86 without VNNI: 0.18 here on AVX2, where int4 costs 0.11)
    assert (report["baseline_int4"]["fidelity"]["output_0"]["relative_l2"]
            != report["baseline"]["fidelity"]["output_0"]["relative_l2"])


# -- the time budget (max_minutes), on a clock the test moves --------------------------------------

def _scoring_clock(monkeypatch, seconds):
    """The job's clock, moved only by the test: each candidate scored costs `seconds`."""
    return JobClock(monkeypatch, PLANNING, "scoring the candidate", seconds)


def _three_minute_search(mlp, tmp_path, monkeypatch, seconds):
    """Run an easy target on the MLP with `"max_minutes": 3`, each candidate scored costing
    `seconds` (`_scoring_clock`); return its result, its search and its budget."""
    clock = _scoring_clock(monkeypatch, seconds)
    result = compressor.compress(mlp, {**FAST, "target": {"relative_l2": 10.0},
                                       "max_minutes": 3},
                                 out_dir=tmp_path / "out", progress=clock.tick)
    return result, result.report["target"], result.report["budget"]


def test_a_budget_that_runs_out_while_scoring_hands_back_the_best_candidate_scored(
        easy, mlp, tmp_path, monkeypatch):
    # 3 minutes, about 60 s kept for export, verification and the report: the scoring stops
    # when less than half of the other 120 s is left, after int8 of the original (scored first,
    # in no time on this clock) and 6 candidates of 10 s.
    result, search, budget = _three_minute_search(mlp, tmp_path, monkeypatch, 10.0)
    everything = easy.report["target"]["candidates"]
    assert len(search["candidates"]) == 7 < len(everything)
    assert (everything[0]["kept_fraction"], everything[0]["quantize"]) == (1.0, "int8")
    # the same walk, cut short (the same figures, but for what latency measured)
    assert (unmeasured(search)["candidates"]
            == unmeasured(easy.report["target"])["candidates"][:7])
    following = everything[7]  # the walk's next: a larger budget, or a quantized one
    quantized = f" with {following['quantize']}" if following["quantize"] else ""
    what = ("the original" if following["kept_fraction"] == 1.0
            else f"the candidate keeping {following['kept_fraction']:g}")
    assert budget["cut"] == [f"target search stopped after 7 candidates, before {what}"
                             f"{quantized}"]
    assert search["chosen"]["bytes"] == min(c["bytes"] for c in search["candidates"])
    assert result.report["onnx_parity"]["passed"] and result.model_path.exists()


def test_a_tight_budget_stops_the_float_budgets_early_to_score_int8_of_the_smallest(
        easy, mlp, tmp_path, monkeypatch):
    # 3 minutes, 60 s kept to finish, half of the other 120 s for the finalists: candidates
    # of 14 s each. Walked until the budget says no, 5 float budgets would take the search's
    # 60 s and leave none for an int8 candidate; the walk stops a budget earlier instead, and
    # int8 of its smallest budget is scored, and ships
    result, search, budget = _three_minute_search(mlp, tmp_path, monkeypatch, 14.0)
    floats = [c["kept_fraction"] for c in easy.report["target"]["candidates"]
              if c["quantize"] is None and c["method"] == "lowrank"]
    assert [(c["kept_fraction"], c["quantize"]) for c in search["candidates"]] == [
        (1.0, "int8"), *[(f, None) for f in floats[:4]], (floats[3], "int8")]
    assert budget["cut"][0] == (f"target search's float budgets stopped at {floats[3]:g}, "
                                f"before {floats[4]:g}, to leave time for int8 candidates")
    assert (search["chosen"]["kept_fraction"], search["chosen"]["quantize"]) == (floats[3], "int8")
    assert search["chosen"]["bytes"] < search["candidates"][0]["bytes"]  # int8 of the original
    assert result.report["onnx_parity"]["passed"] and result.model_path.exists()


def test_a_search_cut_by_the_budget_that_meets_no_floor_says_to_raise_max_minutes(
        mlp, tmp_path, monkeypatch):
    # no budget is within reach of this floor: the largest is scored, then the original
    # quantized, each for 40 s (of the 120 s the search may spend half of)
    clock = JobClock(monkeypatch, PLANNING, "scoring the", 40.0)
    with pytest.raises(TargetNotMetError) as caught:
        compressor.compress(mlp, {**FAST, "target": {"relative_l2": 1e-9}, "max_minutes": 3},
                            out_dir=tmp_path / "out", progress=clock.tick)
    message = caught.value.message
    assert "the best reached output_0 relative L2" in message  # the figures, as without a budget
    assert "The time budget cut the search (max_minutes 3" in message
    assert "target search stopped after 2 candidates, before the original with int4" in message
    assert "raise max_minutes" in message
    assert not (tmp_path / "out" / "model.onnx").exists()


def _without_the_original_quantized(monkeypatch):
    """On the tiny MLP, int8 of the original is smaller than every budget that keeps a floor:
    without it, a compressed candidate is the cheapest."""
    monkeypatch.setattr(Scout, "_original_quantized", lambda *args: None)


def test_an_int8_finalist_beyond_floats_reach_learns_through_its_smoothed_int8(
        mlp, tmp_path, monkeypatch):
    from compressor.search import target as target_module

    _without_the_original_quantized(monkeypatch)
    _smoothing_everywhere(monkeypatch)
    monkeypatch.setattr(Scout, "_walk_int4", lambda *args: None)  # int8 is the smallest form
    # what int8 cost each candidate leaves float fine-tuning no way to the floor
    monkeypatch.setattr(target_module, "quantization_loss_beyond_floor",
                        lambda candidate, *args: "beyond" if candidate.quantize else None)
    trained_with, smoothed_with = [], []
    real_finetune, real_smoothed = target_module.finetune, scout_module.smoothed_for_int8

    def finetune(loaded, plan, student, config, job, **kwargs):
        trained_with.append((config.quantization_aware, kwargs["int8_input_scales"]))
        return real_finetune(loaded, plan, student, config, job, **kwargs)

    def smoothed_for_int8(module, batches, alpha, scales=None):
        smoothed_with.append(scales)
        return real_smoothed(module, batches, alpha, scales)

    monkeypatch.setattr(target_module, "finetune", finetune)
    monkeypatch.setattr(scout_module, "smoothed_for_int8", smoothed_for_int8)
    config = {**FAST, "finetune": {**FAST["finetune"], "steps": 4, "eval_every": 2},
              "target": {"relative_l2": 10.0}}
    result = compressor.compress(mlp, config, out_dir=tmp_path / "out")
    chosen, tried = result.report["target"]["chosen"], result.report["target"]["tries"][-1]
    assert chosen["quantize"] == "int8" and chosen["kept_fraction"] < 1.0
    assert tried["fine_tuned"] == "through int8 arithmetic, simulated (quantization-aware)"
    assert result.report["finetune"]["quantization_aware"] is True
    # the smoothing factors it learned through, measured on θ as initialized ...
    [(aware, scales)] = trained_with
    assert aware and scales and all(s.dim() == 1 for s in scales.values())
    # ... are those its real int8 model is smoothed by when judged after fine-tuning
    assert smoothed_with[-1] is scales
    # ... and the artifact's (θ trained: not the file the search scored)
    assert result.report["finetune"]["best_step"] > 0
    assert ("MatMul inputs divided, by the factors quantization-aware fine-tuning simulated"
            in (tmp_path / "out" / "job.log").read_text())


def test_a_budget_spent_before_any_budget_is_scored_ships_int8_of_the_original(
        easy, mlp, tmp_path, monkeypatch):
    # int8 of the original, scored first, takes the whole budget: it keeps the floor, and is
    # handed back, with nothing set up for training (it has no θ)
    clock = JobClock(monkeypatch, PLANNING, "scoring the original with int8", 130.0)
    targets = []
    real_targets = loop_module._teacher_targets
    monkeypatch.setattr(loop_module, "_teacher_targets",
                        lambda *args: targets.append(1) or real_targets(*args))
    scored = []  # the students scored in PyTorch
    real_score = finetune_stage.held_out_score
    monkeypatch.setattr(finetune_stage, "held_out_score",
                        lambda student, *args: scored.append(student) or real_score(student, *args))
    config = {**FAST, "finetune": {"steps": 5, "loss": "regression"},
              "target": {"relative_l2": 10.0}, "max_minutes": 3}
    result = compressor.compress(mlp, config, out_dir=tmp_path / "out", progress=clock.tick)
    search, budget = result.report["target"], result.report["budget"]
    # its float figures are the original's own, read off its held-out outputs: no pass of it
    assert scored == [None]
    assert result.report["fidelity"]["final"]["output_0"]["relative_l2"] == 0.0
    assert [(c["kept_fraction"], c["quantize"]) for c in search["candidates"]] == [(1.0, "int8")]
    assert (search["chosen"]["kept_fraction"], search["chosen"]["quantize"]) == (1.0, "int8")
    assert budget["cut"] == [f"target search stopped after 1 candidates, before the candidate "
                             f"keeping {easy.report['target']['candidates'][1]['kept_fraction']:g}"]
    assert search["tries"][0]["fine_tuned"] == "not: it compresses no layer, so it has no θ to train"
    assert result.report["finetune"]["steps_run"] == 0 and not targets
    assert search["export"]["quantize"] == "int8"
    assert result.report["onnx_parity"]["passed"] and result.model_path.exists()


def test_with_the_budget_spent_by_the_search_the_cheapest_candidate_meeting_the_floor_ships_untrained(
        easy, mlp, tmp_path, monkeypatch):
    # the first candidate scored takes the whole budget: it met the floor as initialized, and
    # is handed back without a fine-tuning step, nor the training set's targets that steps need
    _without_the_original_quantized(monkeypatch)
    first = next(c["kept_fraction"] for c in easy.report["target"]["candidates"]
                 if c["quantize"] is None)  # the first budget the walk scores
    clock = _scoring_clock(monkeypatch, 130.0)
    targets = []
    real_targets = loop_module._teacher_targets
    monkeypatch.setattr(loop_module, "_teacher_targets",
                        lambda *args: targets.append(1) or real_targets(*args))
    # ... nor a pass of the original or of the student: it was scored in the search
    held_outs, scorings, errors = [], [], []
    real_held_out = HeldOut.of.__func__
    monkeypatch.setattr(HeldOut, "of", classmethod(
        lambda cls, *args, **kwargs: held_outs.append(1) or real_held_out(cls, *args, **kwargs)))
    monkeypatch.setattr(finetune_stage, "fidelity", lambda *args: scorings.append(1))
    monkeypatch.setattr(finetune_stage, "layer_errors", lambda *args: errors.append(1))
    config = {**FAST, "finetune": {"steps": 5, "loss": "regression"},
              "target": {"relative_l2": 10.0}, "max_minutes": 3}
    result = compressor.compress(mlp, config, out_dir=tmp_path / "out", progress=clock.tick)
    search, budget = result.report["target"], result.report["budget"]
    assert [c["kept_fraction"] for c in search["candidates"]] == [first]
    assert search["chosen"]["kept_fraction"] == first
    assert result.report["finetune"]["steps_run"] == 0
    assert budget["cut"][0].startswith("target search stopped after 1 candidates")
    assert budget["cut"][1:] == [f"fine-tuning skipped: the search spent the budget, and "
                                 f"candidate kept {first:g} ships as initialized"]
    assert search["tries"][0]["fine_tuned"].startswith("not: the search spent the time budget")
    assert not targets
    assert len(held_outs) == 1 and not scorings and not errors  # the search's held-out only
    fidelity = result.report["fidelity"]
    assert (fidelity["initialization"]["output_0"]["relative_l2"]
            == fidelity["final"]["output_0"]["relative_l2"]
            == search["candidates"][0]["fidelity"]["output_0"]["relative_l2"])
    assert result.report["finetune"]["skipped"] == (
        f"fine-tuning skipped: the search spent the time budget; candidate kept {first:g} "
        "ships as initialized")
    assert result.report["onnx_parity"]["passed"] and result.model_path.exists()


def test_a_finalist_the_budget_left_cannot_set_up_for_fine_tuning_ships_untrained(
        easy, mlp, tmp_path, monkeypatch):
    # 3 minutes, 60 s kept for export, verification and the report; the first candidate's
    # scoring in PyTorch takes 100 s of the 120: 10 s are left, less than the held-out pass that
    # fine-tuning starts with. It met the floor: it ships as scored, without a step (without
    # the rule it trained its 5 steps, past the budget by that pass on a real clock).
    _without_the_original_quantized(monkeypatch)
    first = next(c["kept_fraction"] for c in easy.report["target"]["candidates"]
                 if c["quantize"] is None)
    clock = _scoring_clock(monkeypatch, 10.0)
    real_fidelity = scout_module.fidelity

    def slow_fidelity(*args):
        clock.now += 100.0
        return real_fidelity(*args)

    monkeypatch.setattr(scout_module, "fidelity", slow_fidelity)
    config = {**FAST, "finetune": {"steps": 5, "loss": "regression"},
              "target": {"relative_l2": 10.0}, "max_minutes": 3}
    result = compressor.compress(mlp, config, out_dir=tmp_path / "out", progress=clock.tick)
    search, budget = result.report["target"], result.report["budget"]
    assert [c["kept_fraction"] for c in search["candidates"]] == [first]
    assert result.report["finetune"]["steps_run"] == 0
    assert budget["cut"][-1] == (f"fine-tuning skipped: the search spent the budget, and "
                                 f"candidate kept {first:g} ships as initialized")
    assert result.report["onnx_parity"]["passed"] and result.model_path.exists()


def test_a_finalist_in_training_keeps_time_to_ship_one_that_met_the_floor_untrained(tmp_path):
    # what shipping each untried candidate untrained takes: its student built as in the
    # search, and scored in PyTorch unless the search scored it (or its float twin) there, or
    # it is the original (its figures are read off the held-out outputs)
    from types import SimpleNamespace

    from compressor.runtime.budget import TimeBudget

    def candidate(fraction, quantize, score=None):
        return Candidate(fraction, quantize, 10, 40, {}, True, held_out_score=score,
                         plan=SimpleNamespace(fraction=fraction,
                                              compressed=["layer"] if fraction < 1 else []))

    budget = TimeBudget(45, lambda: 0.0)
    scout = _bare_scout(tmp_path, budget=budget)
    scout.loaded = SimpleNamespace(output_names=[])
    training = candidate(0.8, "int8")
    original_int8 = candidate(1.0, "int8")  # the original: nothing to score in PyTorch
    unscored = candidate(0.7, "int8")  # its float twin was not scored
    floats = candidate(0.9, None, score=0.1)  # scored in PyTorch in the search
    scout.built_s = {id(original_int8.plan): 2.0, id(floats.plan): 7.0, id(unscored.plan): 3.0}
    scout.scoring_s = 30.0
    everything = [training, original_int8, unscored, floats]
    assert scout.fallback_s(training, [original_int8], everything) == 2.0
    assert scout.fallback_s(training, [unscored], everything) == 33.0
    assert scout.fallback_s(training, [floats], everything) == 7.0
    assert scout.fallback_s(training, [floats, unscored], everything) == 33.0
    # one an earlier try scored: the longest build the search made stands in for its own
    retried = candidate(0.95, "int8")
    assert scout.fallback_s(training, [retried], everything + [retried]) == 37.0
    assert scout.fallback_s(training, [], everything) == 0.0  # nothing to fall back on
    budget.max_minutes = None  # no budget: nothing is kept
    assert scout.fallback_s(training, [unscored], everything) == 0.0


def _bare_scout(tmp_path, objective="latency", budget=None):
    """A scout with only what ordering the finalists reads: a job (log, `budget`: none by
    default)."""
    from types import SimpleNamespace

    from compressor.runtime.budget import TimeBudget

    scout = object.__new__(Scout)
    budget = budget or TimeBudget(None, lambda: 0.0)
    scout.job = SimpleNamespace(control=SimpleNamespace(budget=budget), log=JobLog(None),
                                scratch=tmp_path)
    scout.workdir, scout.kept_files = tmp_path, None
    scout.target = SimpleNamespace(objective=objective)
    return scout


def _timed_candidate(name, latency_ms, tmp_path, meets_floor=True):
    path = tmp_path / name / "model.onnx"
    path.parent.mkdir()
    path.write_text(name)
    return Candidate(0.9, "int8", 10, 40, {}, meets_floor, latency_ms=latency_ms,
                     shipped_file=path)


def test_the_latency_objective_orders_its_finalists_by_timings_in_turn(tmp_path, monkeypatch):
    # onnxruntime by the test's word: each file's own time, the machine twice as slow in every
    # other timing (what the walk's one-after-another timings could not tell from speed)
    own = {"fastest": 10.0, "close": 9.5, "near": 10.5, "far": 30.0}
    calls = []

    def latencies_ms(self, paths, seconds):
        calls.append(sorted(path.read_text() for path in paths.values()))
        slow = 2.0 if len(calls) % 2 == 0 else 1.0
        return {name: slow * own[path.read_text()] for name, path in paths.items()}

    monkeypatch.setattr(Scout, "_latencies_ms", latencies_ms)
    scout = _bare_scout(tmp_path)
    fastest, close, far = (_timed_candidate(name, ms, tmp_path)
                           for name, ms in (("fastest", 10.0), ("close", 10.5), ("far", 20.0)))
    near = _timed_candidate("near", 9.0, tmp_path, meets_floor=False)
    tried_near, meeting = scout.fastest_in_turn([near], [fastest, close, far])
    # the near one and the one within LATENCY_TIE, each timed in turn with the fastest; the
    # far one is not timed again
    assert calls == [["fastest", "near"], ["close", "fastest"]]
    assert meeting == [close, fastest, far] and tried_near == []  # no faster in turn: not tried
    assert (close.latency_ms, fastest.latency_ms, near.latency_ms) == (9.5, 10.0, 10.5)
    assert far.latency_ms == 20.0
    assert "; kept 0.9 int8 is not fine-tuned: no faster than kept 0.9 int8" in (
        scout.job.log._file.getvalue())


def test_the_size_objective_times_the_candidates_as_small_as_the_smallest_in_turn(tmp_path,
                                                                                  monkeypatch):
    monkeypatch.setattr(Scout, "_latencies_ms", _timed_as(
        lambda path: {"smallest": 3.0, "tied": 2.0, "larger": 1.0}[path.read_text()]))
    scout = _bare_scout(tmp_path, "size")
    smallest, tied, larger = (_timed_candidate(name, 1.0, tmp_path)
                              for name in ("smallest", "tied", "larger"))
    tie = scout_module.SIZE_TIE
    tied.bytes, larger.bytes = 40 * (1 + tie), 40 * (1 + 2 * tie)
    assert scout.fastest_first([smallest, tied, larger]) == [tied, smallest, larger]
    assert (smallest.latency_ms, tied.latency_ms, larger.latency_ms) == (3.0, 2.0, 1.0)


def test_a_file_timed_in_the_walk_is_kept_until_the_finalists_are_ordered(tmp_path):
    scout = _bare_scout(tmp_path)
    scratch = tmp_path / "export"
    scratch.mkdir()
    (scratch / "model.onnx").write_text("graph")
    (scratch / "model.onnx.data").write_text("weights")
    kept = scout.keep(scratch / "model.onnx")
    shutil.rmtree(scratch)  # the walk's scratch folder goes after the candidate is scored
    assert kept.read_text() == "graph" and kept.with_name("model.onnx.data").read_text() == (
        "weights")
    scout.drop_kept_files()
    assert not kept.exists() and scout.kept_files is None
    assert list(tmp_path.iterdir()) == []


def test_a_candidates_export_sets_what_is_kept_for_the_artifacts_export(mlp, tmp_path,
                                                                         monkeypatch):
    # each candidate's export takes 50 s on the job's clock, and an int8 one's held-out pass in
    # onnxruntime 20 s (an int4 one's 100 s): the reserve the model's size gave (about 60 s for
    # a tiny model) grows to what the artifact's export, its verification and the report then
    # need, 60 s + 4 × 50 s + 5 × 20 s
    clock = JobClock(monkeypatch, PLANNING, "no event moves this clock", 0.0)
    real_export, real_fidelity = scout_module.export_onnx, scout_module.onnx_fidelity

    def slow_export(*args):
        clock.now += 50.0
        return real_export(*args)

    def slow_pass(path, *args):
        clock.now += 20.0 if "int8" in path.parts else 100.0
        return real_fidelity(path, *args)

    monkeypatch.setattr(scout_module, "export_onnx", slow_export)
    monkeypatch.setattr(scout_module, "onnx_fidelity", slow_pass)
    result = compressor.compress(mlp, {**FAST, "target": {"relative_l2": 10.0},
                                       "max_minutes": 30},
                                 out_dir=tmp_path / "out", progress=clock.tick)
    assert result.report["budget"]["reserve_s"] == pytest.approx(360.0)
    log = (tmp_path / "out" / "job.log").read_text()
    assert ("a candidate's export took 50 s, an int8 candidate's held-out pass in onnxruntime "
            "20 s; 360 s are now kept for the artifact's export, verification and the "
            "report") in log


@pytest.mark.parametrize("floor, cosine, reachable", [
    (0.99, 0.9851, True), (0.99, 0.9849, False),  # 1 - cosine at most 1.5 × the floor's
    (0.99, 0.9812, False),  # MiniLM's kept 0.8 + int8: 300 steps took it to 0.9862 and missed
    (0.95, 0.926, True), (0.95, 0.924, False),  # a lower floor leaves fine-tuning more to take
])
def test_a_cosine_is_within_fine_tunings_reach_by_its_distance_from_one(floor, cosine,
                                                                         reachable):
    embedding = {"out": {"kind": "embedding", "cosine": cosine}}
    assert within_reach(embedding, TargetConfig(cosine=floor)) is reachable


# A causal language model's next-token logits, as the fidelity meter scores them.
LM_LOGITS = {"kind": "logits", "cosine": 0.9, "relative_l2": 0.4, "top1_agreement": 0.6,
             "perplexity": 42.0, "original_perplexity": 40.0, "next_token_agreement": 0.6,
             "kl_divergence": 0.2, "next_tokens": 1000}


def test_a_language_models_logits_are_judged_by_perplexity_over_the_originals():
    target = TargetConfig()  # perplexity_ratio 1.05; top-1 agreement 0.99, which 0.6 misses
    assert target.margin(LM_LOGITS) == pytest.approx(1.05 - 42.0 / 40.0)
    assert target.met_by({"logits": LM_LOGITS})
    worse = {**LM_LOGITS, "perplexity": 44.0}  # 1.10 × the original's
    assert not target.met_by({"logits": worse})
    assert TargetConfig(perplexity_ratio=1.2).met_by({"logits": worse})
    assert describe_fidelity({"logits": worse}) == "logits perplexity × the original's 1.1000"
    # within fine-tuning's reach: at most REACH_PERPLEXITY_RATIO above the floor
    assert within_reach({"logits": worse}, target)
    assert not within_reach({"logits": {**LM_LOGITS, "perplexity": 48.0}}, target)
    # a classifier's logits (no perplexity) are still judged by top-1 agreement
    classifier = {k: v for k, v in LM_LOGITS.items() if k in ("kind", "cosine", "relative_l2",
                                                              "top1_agreement")}
    assert target.margin(classifier) == pytest.approx(0.6 - 0.99)
    assert describe_fidelity({"logits": classifier}) == "logits top-1 agreement 0.6000"


def _scored(fraction, quantize, figures):
    """A candidate as scored: a quantized one a quarter of its float twin's bytes."""
    return Candidate(fraction, quantize, 10, 40 if quantize is None else 10, {"out": figures},
                     False)


@pytest.mark.parametrize("figure, float_value, quantized, beyond", [
    ("cosine", 0.9974, 0.9811, True),  # a random-weight BERT-base's kept 0.85 + int4
    ("cosine", 0.9800, 0.9790, False),  # the float model is what misses: fine-tuning's to win
    ("relative_l2", 0.01, 0.08, True),  # floor 0.05: quantizing alone adds 0.07
    ("relative_l2", 0.06, 0.07, False),
])
def test_a_quantized_finalist_trained_in_float_is_not_tried_when_quantizing_alone_misses(
        figure, float_value, quantized, beyond):
    from compressor.search.candidates import quantization_loss_beyond_floor

    kind = {"cosine": "embedding", "relative_l2": "regression"}[figure]
    target = TargetConfig()
    twin = _scored(0.85, None, {"kind": kind, figure: float_value})
    candidate = _scored(0.85, "int4", {"kind": kind, figure: quantized})
    said = quantization_loss_beyond_floor(candidate, [twin, candidate], target)
    assert (said is not None) == beyond
    if beyond:
        assert said.startswith("int4 cost its out ") and "beyond the floor" in said
    # no float twin scored (another budget's): nothing to judge by
    assert quantization_loss_beyond_floor(candidate, [candidate], target) is None


def test_the_finalists_leave_out_int4_that_quantizing_puts_beyond_and_train_int8_through_it():
    from types import SimpleNamespace

    from compressor.config import ExportConfig
    from compressor.search.target import _finalists, _through_int8

    logged = []
    job = SimpleNamespace(log=SimpleNamespace(info=logged.append))
    figures = {"kind": "embedding", "cosine": 0.9861}
    twin = _scored(0.85, None, {"kind": "embedding", "cosine": 0.9974})
    twin.meets_floor = True
    int4 = _scored(0.85, "int4", figures)
    smoothed = _scored(0.85, "int8", figures)  # int8 took 0.011: float steps cannot take it back
    unsmoothed = _scored(0.85, "int8", figures)
    unsmoothed.unsmoothed = True
    scored = [twin, int4, smoothed, unsmoothed]
    near, meeting = _finalists(scored, TargetConfig(), ExportConfig(), job)
    assert near == [smoothed, unsmoothed] and meeting == [twin]
    assert len(logged) == 2 and logged[0].startswith("target: kept 0.85 int4 is not fine-tuned: ")
    assert logged[1].startswith("target: kept 0.85 int8 learns through its smoothed int8, not in "
                                "float: int8 cost its out cosine 0.9974 -> 0.9861")
    # what each learns through: int8 beyond the floor in float and unsmoothed int8 through it
    export = ExportConfig()
    assert [_through_int8(c, scored, TargetConfig(), export) for c in scored] == [
        False, False, True, True]
    # a smoothed int8 whose int8 cost leaves the floor within float's reach learns in float
    near_float = _scored(0.85, "int8", {"kind": "embedding", "cosine": 0.9960})
    assert not _through_int8(near_float, [twin, near_float], TargetConfig(), export)
    # no float twin scored: nothing says float cannot reach it
    assert not _through_int8(smoothed, [smoothed], TargetConfig(), export)
    # without smoothing every int8 finalist learns through int8
    assert _through_int8(near_float, [twin, near_float], TargetConfig(),
                         ExportConfig(int8_smoothing=None))


def test_a_language_models_quantization_is_judged_by_its_perplexity_factor():
    from compressor.search.candidates import quantization_loss_beyond_floor

    target = TargetConfig()  # perplexity at most 1.05 × the original's
    twin = _scored(0.8, None, {**LM_LOGITS, "perplexity": 48.0})  # 1.2 × (fine-tuning's to win)
    close = _scored(0.8, "int8", {**LM_LOGITS, "perplexity": 49.0})  # int8: × 1.02
    far = _scored(0.8, "int8", {**LM_LOGITS, "perplexity": 52.8})  # int8: × 1.1
    assert quantization_loss_beyond_floor(close, [twin, close], target) is None
    assert "1.1000, beyond the floor 1.05" in quantization_loss_beyond_floor(far, [twin, far],
                                                                             target)


def test_the_search_corrects_each_budget_once_and_scores_it_as_if_corrected_again(
        mlp, tmp_path, monkeypatch):
    corrected = []
    correct = rewrite_stage.correct_sequentially_

    def counting(student, teacher, plan, batches):
        corrected.append(json.dumps(plan.to_dict(), sort_keys=True, default=str))
        return correct(student, teacher, plan, batches)

    monkeypatch.setattr(rewrite_stage, "correct_sequentially_", counting)
    config = {**FAST, "target": {"relative_l2": 10.0}}
    kept = compressor.compress(mlp, config, out_dir=tmp_path / "kept")
    assert corrected and len(corrected) == len(set(corrected))
    log = (tmp_path / "kept" / "job.log").read_text()
    assert "θ as this job corrected it for the same plan before" in log

    corrected.clear()  # the same job with nothing kept: students of one plan corrected again
    monkeypatch.setattr(CorrectedThetas, "load_", lambda self, plan, settings, params: False)
    again = compressor.compress(mlp, config, out_dir=tmp_path / "again")
    assert len(corrected) > len(set(corrected))
    assert unmeasured(again.report["target"]) == unmeasured(kept.report["target"])


def test_a_quantized_finalist_no_step_improved_is_not_quantized_and_scored_again(
        easy, mlp, tmp_path, monkeypatch):
    # No step (here: none at all) did better than the initialization, whose θ fine-tuning
    # restores exactly: the finalist's real quantized model is the one scored as a candidate
    # (Gemma-3 270M: 145 s to export, quantize and score it again for the same figures).
    assert easy.report["target"]["chosen"]["quantize"] is not None
    scored = []
    real = Scout.quantized_fidelity

    def counting(self, *args, **kwargs):
        scored.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Scout, "quantized_fidelity", counting)
    result = compressor.compress(mlp, {**FAST, "target": {"relative_l2": 10.0}},
                                 out_dir=tmp_path / "out")
    search = result.report["target"]
    assert len(scored) == sum(c["quantize"] is not None for c in search["candidates"])
    assert search["tries"][0]["fidelity"] == search["chosen"]["fidelity"]
    assert unmeasured(search)["chosen"] == unmeasured(easy.report["target"])["chosen"]


def test_the_searchs_held_out_outputs_wait_on_disk_and_score_the_same(easy, mlp, tmp_path,
                                                                      monkeypatch):
    # The search only scores against the original's held-out outputs: too large to hold (a
    # language model's logits), they go to the job's scratch folder, and every candidate
    # scores as it does with them in memory.
    monkeypatch.setattr(loop_module, "_HELD_OUT_MEMORY_BYTES", 0)
    made = []
    real_of = HeldOut.of.__func__

    def recording(cls, *args, **kwargs):
        held_out = real_of(cls, *args, **kwargs)
        made.append((kwargs.get("for_training", True), type(held_out.reference).__name__))
        return held_out

    monkeypatch.setattr(HeldOut, "of", classmethod(recording))
    result = compressor.compress(mlp, {**FAST, "target": {"relative_l2": 10.0}},
                                 out_dir=tmp_path / "out")
    assert made[0] == (False, "SpilledTensors")  # the search's
    assert all(kind == "list" for training, kind in made if training)  # no top k: kept whole
    assert unmeasured(result.report["target"]) == unmeasured(easy.report["target"])


def test_the_search_frees_each_scored_student_before_building_the_next(mlp, tmp_path,
                                                                       monkeypatch):
    built, alive_at_each_build = [], []
    build = scout_module.build_student

    def tracking(*args, **kwargs):
        student = build(*args, **kwargs)  # collects the dropped ones first
        alive_at_each_build.append(sum(ref() is not None for ref in built))
        built.append(weakref.ref(student))
        return student

    monkeypatch.setattr(scout_module, "build_student", tracking)
    compressor.compress(mlp, {**FAST, "target": {"relative_l2": 10.0}}, out_dir=tmp_path)
    assert len(built) > 3
    assert max(alive_at_each_build) == 0  # a GraphModule's cycles do not keep one alive


@pytest.mark.parametrize("original_l2, walked", [(0.10, False), (0.07, True)])
def test_int4_is_stacked_on_no_budget_when_int4_of_the_original_is_beyond_reach(
        original_l2, walked):
    from types import SimpleNamespace

    logged, afforded = [], []
    scout = SimpleNamespace(
        target=TargetConfig(relative_l2=0.05),  # within reach: at most 1.5 × the floor, 0.075
        job=SimpleNamespace(log=SimpleNamespace(info=logged.append)),
        _affords=lambda candidates, what: afforded.append(what) and False)
    original = _scored(1.0, "int4", {"kind": "regression", "relative_l2": original_l2})
    int8 = _scored(0.8, "int8", {"kind": "regression", "relative_l2": 0.06})
    Scout._walk_int4(scout, [int8, original], [(0.8, None)])
    assert afforded == (["the candidate keeping 0.8 with int4"] if walked else [])
    assert (logged == ["target: int4 is stacked on no budget: int4 of the original is beyond "
                       "fine-tuning's reach of the floor, and a smaller budget only loses more"]
            ) is not walked
