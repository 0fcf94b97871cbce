"""The whole job through `compressor.compress`, on tiny models, with exact checks."""

import json
import re

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import compressor
from compressor.errors import CancelledError, JobTimeoutError, ModelFormatError, VerificationError
from compressor.finetune import loop as finetune_loop
from compressor.finetune import stage as finetune_stage
from compressor.report.figures import sha256_of
from compressor.vocabulary import JOB_STAGES
from tests.support.clock import JobClock
from tests.support.tiny_models import MODEL_CLASSES, TinyMLP, example_inputs, make_pt2

FAST = {"ratio": 0.5, "finetune": {"steps": 4, "eval_every": 2}, "export": {"latency_seconds": 0}}


def fast(**overrides):
    config = json.loads(json.dumps(FAST))
    for key, value in overrides.items():
        if isinstance(value, dict):
            config.setdefault(key, {}).update(value)
        else:
            config[key] = value
    return config


def run_onnx(path, inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in inputs.items()})


@pytest.fixture(scope="module")
def programs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("programs")
    return {kind: make_pt2(kind, folder / f"{kind}.pt2") for kind in ("mlp", "conv", "text")}


@pytest.mark.slow
@pytest.mark.parametrize("kind,form", [("mlp", "dense"), ("conv", "dense"), ("conv", "factorized"),
                                       ("text", "dense"), ("text", "factorized")])
def test_compress_writes_a_verified_onnx_with_the_programs_input_names(programs, tmp_path,
                                                                       kind, form):
    result = compressor.compress(programs[kind], fast(export={"form": form}), out_dir=tmp_path)
    model = onnx.load(str(result.model_path))
    program = torch.export.load(str(programs[kind]))
    assert [i.name for i in model.graph.input] == list(program.graph_signature.user_inputs)
    assert all(i.type.tensor_type.shape.dim[0].dim_param for i in model.graph.input)
    # Dynamic batch: the same file runs at batch 1 and batch 7 and matches the original closely.
    inputs = example_inputs(MODEL_CLASSES[kind](), batch=7, seed=5)
    outputs = run_onnx(result.model_path, inputs)
    reference = program.module()(**inputs)
    reference = reference if isinstance(reference, tuple) else (reference,)
    assert len(outputs) == len(reference)
    assert run_onnx(result.model_path, {k: v[:1] for k, v in inputs.items()})[0].shape[0] == 1
    report = result.report
    assert report["onnx_parity"]["passed"] and report["onnx_parity"]["samples"] > 1
    assert report["plan"]["layers"] and all(
        {"method", "size", "relative_weight_error", "relative_output_error"} <= set(layer)
        for layer in report["plan"]["layers"] if layer["method"] != "dense")
    if form == "factorized":
        assert report["parameters"]["after"] < report["parameters"]["before"]
        assert report["flops"]["after"] < report["flops"]["before"]
    else:
        assert report["flops"]["after"] == report["flops"]["before"]
    assert report["artifacts"]["model.onnx"]["sha256"] == sha256_of(result.model_path)
    assert json.loads(result.report_path.read_text()) == json.loads(json.dumps(report))


@pytest.mark.slow
def test_the_report_has_every_figure_the_spec_lists(programs, tmp_path):
    result = compressor.compress(programs["mlp"], fast(export={"latency_seconds": 0.05}),
                                 out_dir=tmp_path)
    report = result.report
    assert report["parameters"]["targeted_weights_after"] < report["parameters"]["targeted_weights_before"]
    assert report["flops"]["factorized_form"] < report["flops"]["before"]
    assert report["onnx_bytes"]["artifact"] <= report["onnx_bytes"]["original"]
    for side in ("original", "compressed"):
        assert set(report["latency"][side]) == {"batch_1_ms", "batch_32_ms"}
        assert all(v > 0 for v in report["latency"][side].values())
    final = report["fidelity"]["final"]["output_0"]
    assert {"cosine", "relative_l2", "top1_agreement"} <= set(final)  # logits: top-1 reported
    stages = set(JOB_STAGES)
    assert set(report["stage_seconds"]) == stages
    # Each stage's peak memory is measured, and the job stays within its bound of the model.
    memory = report["memory"]
    assert set(memory["stage_peak_rss_bytes"]) == stages
    assert all(peak > 0 for peak in memory["stage_peak_rss_bytes"].values())
    assert memory["model_bytes"] == 4 * report["parameters"]["before"]
    assert set(report["versions"]) >= {"torch", "onnx", "onnxruntime"}
    assert report["data"]["synthetic"] and "sampled" in report["data"]["note"]
    assert report["artifacts"]["job.log"]["sha256"] == sha256_of(result.log_path)
    assert "succeeded" in result.log_path.read_text()


@pytest.mark.slow
def test_fine_tuning_improves_fidelity_and_never_returns_a_worse_model(programs, tmp_path):
    tuned = compressor.compress(programs["mlp"], fast(ratio=0.25, finetune={
        "steps": 60, "lr": 3e-3, "eval_every": 10}), out_dir=tmp_path / "tuned")
    summary = tuned.report["finetune"]
    assert summary["best_score"] < summary["initial_score"]
    wrecked = compressor.compress(programs["mlp"], fast(ratio=0.25, finetune={
        "steps": 20, "lr": 1.0, "eval_every": 5}), out_dir=tmp_path / "wrecked")
    summary = wrecked.report["finetune"]
    assert summary["best_score"] <= summary["initial_score"]
    # A learning rate this high makes an evaluation worse: θ rolls back and the lr halves.
    backoffs = [h["backoff"] for h in summary["history"] if "backoff" in h]
    assert backoffs and backoffs[0].endswith("lr × 0.5")
    final = wrecked.report["fidelity"]["final"]["output_0"]["relative_l2"]
    initial = wrecked.report["fidelity"]["initialization"]["output_0"]["relative_l2"]
    assert final <= initial + 1e-9


@pytest.mark.slow
def test_the_same_seed_gives_the_same_model(programs, tmp_path):
    config = fast(finetune={"steps": 6, "eval_every": 3, "seed": 7})
    first = compressor.compress(programs["mlp"], config, out_dir=tmp_path / "a")
    second = compressor.compress(programs["mlp"], config, out_dir=tmp_path / "b")
    inputs = example_inputs(TinyMLP(), batch=5)
    np.testing.assert_array_equal(run_onnx(first.model_path, inputs)[0],
                                  run_onnx(second.model_path, inputs)[0])
    assert first.report["fidelity"] == second.report["fidelity"]


def test_cancelling_stops_during_fine_tuning_and_leaves_no_artifact(programs, tmp_path):
    events = []
    with pytest.raises(CancelledError):
        compressor.compress(programs["mlp"], fast(finetune={"steps": 500}), out_dir=tmp_path,
                            progress=events.append,
                            should_stop=lambda: sum(e.stage == "finetuning" for e in events) > 3)
    assert events[-1].stage == "finetuning" and events[-1].fraction < 0.05
    assert not (tmp_path / "model.onnx").exists() and not (tmp_path / "report.json").exists()
    assert "cancelled" in (tmp_path / "job.log").read_text()


def test_timeout_fails_with_code_timeout(programs, tmp_path):
    with pytest.raises(JobTimeoutError) as raised:
        compressor.compress(programs["mlp"], fast(timeout_s=0.001, max_minutes=None),
                            out_dir=tmp_path)
    assert raised.value.code == "timeout" and "timeout_s" in raised.value.message


@pytest.mark.slow
def test_a_verification_mismatch_fails_loudly_and_keeps_no_artifact(programs, tmp_path):
    with pytest.raises(VerificationError, match="output_0"):
        compressor.compress(programs["mlp"], fast(export={"atol": 1e-30, "rtol": 0,
                                                          "noise_multiple": 0}),
                            out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.log"]


def test_a_bad_model_file_fails_with_the_loaders_message(tmp_path):
    bad = tmp_path / "model.pt2"
    bad.write_bytes(b"not a model")
    with pytest.raises(ModelFormatError):
        compressor.compress(bad, fast(), out_dir=tmp_path / "out")
    assert (tmp_path / "out" / "job.log").exists()


@pytest.mark.slow
def test_keeping_everything_reproduces_the_original_through_a_data_file(programs, tmp_path):
    # safetensors returns names sorted (attention_mask before input_ids): the job must still feed
    # every input by name, never by position, in training, export and verification.
    from safetensors.torch import save_file

    inputs = example_inputs(MODEL_CLASSES["text"](), batch=40, seed=3)
    save_file(inputs, tmp_path / "data.safetensors")
    # Full rank everywhere is lossless: the job must change nothing.
    full_rank = [{"match": "classifier", "rank": 4}, {"match": "*", "rank": 32}]
    result = compressor.compress(programs["text"], fast(overrides=full_rank),
                                 data=tmp_path / "data.safetensors", out_dir=tmp_path / "out")
    assert all(p["relative_weight_error"] < 1e-5 for p in result.report["plan"]["layers"])
    assert result.report["data"]["source"] == "data.safetensors"
    probe = example_inputs(MODEL_CLASSES["text"](), batch=6, seed=11)
    expected = torch.export.load(str(programs["text"])).module()(**probe)
    got = run_onnx(result.model_path, dict(sorted(probe.items())))
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, e.detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("form", ["dense", "factorized"])
def test_int8_stacks_on_either_form_verified_against_the_compressed_model(programs, tmp_path, form):
    config = fast(ratio=0.5, export={"form": form})
    plain = compressor.compress(programs["text"], config, out_dir=tmp_path / "float")
    config["export"]["quantize"] = "int8"
    config["export"]["int8_smoothing"] = None  # its divisors weigh on a model this tiny
    quantized = compressor.compress(programs["text"], config, out_dir=tmp_path / "int8")
    # Weights become int8; on a model this tiny the graph's own bytes are a large share.
    assert quantized.model_path.stat().st_size < 0.7 * plain.model_path.stat().st_size
    parity = quantized.report["onnx_parity"]["quantized"]
    assert parity["passed"] and set(parity["relative_l2"]) == {"output_0", "output_1"}
    assert all(0 < error <= 0.3 for error in parity["relative_l2"].values())
    # The report scores the int8 file itself against the original, next to the float model.
    artifact = quantized.report["fidelity"]["artifact"]["output_1"]
    assert artifact["kind"] == "embedding" and 0.9 < artifact["cosine"] <= 1.0
    assert "artifact" not in plain.report["fidelity"]
    inputs = example_inputs(MODEL_CLASSES["text"](), batch=5, seed=2)
    want, got = run_onnx(plain.model_path, inputs), run_onnx(quantized.model_path, inputs)
    for w, g in zip(want, got, strict=True):
        assert np.linalg.norm(g - w) / np.linalg.norm(w) < 0.3


@pytest.mark.slow
def test_an_int8_model_too_far_from_the_compressed_one_is_refused(programs, tmp_path):
    config = fast(export={"quantize": "int8", "quantized_tolerance": 1e-9})
    with pytest.raises(VerificationError, match="int8 model differs"):
        compressor.compress(programs["text"], config, out_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.log"]


# -- the time budget (max_minutes), on a clock the test moves --------------------------------------

@pytest.fixture
def clock(monkeypatch):
    """The job's clock, moved only by the test: each fine-tuning step reported costs 10 s."""
    return JobClock(monkeypatch, "finetuning", "step ", 10.0)


def test_a_budget_that_runs_out_mid_fine_tuning_stops_it_and_the_artifact_is_still_verified(
    programs, tmp_path, clock
):
    # 3 minutes: 60 s (and a little) kept for export, verification and the report leave 120 s,
    # about 11 steps of 10 s of the 50 asked for.
    result = compressor.compress(programs["mlp"], fast(finetune={"steps": 50, "eval_every": 5},
                                                       max_minutes=3),
                                 out_dir=tmp_path, progress=clock.tick)
    report, finetune = result.report, result.report["finetune"]
    assert 0 < finetune["steps_run"] < 50 and finetune["steps"] == 50
    # the learning rate's cosine was shortened to end where the budget stopped the run
    assert finetune["schedule_steps"] == finetune["steps_run"]
    stopped = f"fine-tuning stopped at step {finetune['steps_run']} of 50"
    assert finetune["cut_by_budget"].startswith(stopped)
    assert "raise max_minutes" in finetune["cut_by_budget"]
    assert report["budget"]["max_minutes"] == 3 and report["budget"]["cut"] == [stopped]
    assert report["budget"]["elapsed_s"] <= 3 * 60
    # θ where it stopped was scored, and the best θ is what ships
    assert finetune["history"][-1]["step"] == finetune["steps_run"]
    assert finetune["best_score"] == min([finetune["initial_score"]]
                                         + [h["held_out"] for h in finetune["history"]])
    assert report["onnx_parity"]["passed"]
    assert report["artifacts"]["model.onnx"]["sha256"] == sha256_of(result.model_path)
    assert stopped in (tmp_path / "job.log").read_text()


def test_fine_tuning_stopped_by_the_budget_keeps_time_to_score_where_it_stopped(
    programs, tmp_path, clock, monkeypatch
):
    # A held-out scoring pass costs 30 s here: the initial one (which fine-tuning measures),
    # the one that scores θ where the budget stops it (no evaluation before: `eval_every` is
    # beyond the steps), and the best θ's figures after. The last still ends before what
    # export, verification and the report are kept (which take no time on this clock).
    def costly(real):
        def scoring(*args, **kwargs):
            clock.now += 30.0
            return real(*args, **kwargs)
        return scoring

    monkeypatch.setattr(finetune_stage, "held_out_score",
                        costly(finetune_stage.held_out_score))
    monkeypatch.setattr(finetune_loop, "held_out_score", costly(finetune_loop.held_out_score))
    result = compressor.compress(programs["mlp"], fast(finetune={"steps": 50, "eval_every": 100},
                                                       max_minutes=3),
                                 out_dir=tmp_path, progress=clock.tick)
    budget, finetune = result.report["budget"], result.report["finetune"]
    assert 0 < finetune["steps_run"] < 50
    assert finetune["history"][-1] == {"step": finetune["steps_run"], "note": "budget",
                                       "held_out": finetune["history"][-1]["held_out"]}
    assert budget["elapsed_s"] <= 3 * 60 - budget["reserve_s"]
    assert "the held-out passes after it 60 s" in finetune["cut_by_budget"]


@pytest.mark.parametrize("max_minutes", [None, "default"])
def test_without_a_budget_or_within_the_default_one_nothing_is_cut(programs, tmp_path, clock,
                                                                   max_minutes):
    given = {} if max_minutes == "default" else {"max_minutes": max_minutes}
    result = compressor.compress(programs["mlp"], fast(finetune={"steps": 12, "eval_every": 6},
                                                       **given),
                                 out_dir=tmp_path, progress=clock.tick)
    assert result.report["finetune"]["steps_run"] == 12
    assert result.report["finetune"]["schedule_steps"] == 12
    assert result.report["finetune"]["cut_by_budget"] is None
    assert result.report["budget"]["max_minutes"] == (None if max_minutes is None else 45)
    assert result.report["budget"]["cut"] == []


def test_a_job_too_long_for_its_timeout_stops_in_time_by_default_instead_of_failing(
        programs, tmp_path, clock):
    # 3,000 steps of 10 s (the test moves the clock) do not fit in the 3,600 s timeout; the
    # default budget, 45 minutes, stops fine-tuning in time and the job hands back a model
    result = compressor.compress(programs["mlp"], fast(finetune={"steps": 3000, "eval_every": 500}),
                                 out_dir=tmp_path, progress=clock.tick)
    finetune, budget = result.report["finetune"], result.report["budget"]
    assert budget["max_minutes"] == 45 and budget["elapsed_s"] < 45 * 60
    assert 0 < finetune["steps_run"] < 3000 and finetune["cut_by_budget"] is not None
    assert (tmp_path / "model.onnx").exists()


def test_a_budget_too_small_for_anything_still_ends_with_a_verified_artifact(programs, tmp_path):
    # 30 s is less than what export, verification and the report are kept: no step is taken,
    # calibration takes its fewest samples, and the job says so (real clock: nothing to move).
    result = compressor.compress(programs["mlp"], fast(finetune={"steps": 50}, max_minutes=0.5),
                                 out_dir=tmp_path)
    report = result.report
    assert report["finetune"]["steps_run"] == 0
    assert "fine-tuning stopped at step 0 of 50" in report["budget"]["cut"]
    assert any(cut.startswith("calibration on 8 of ") for cut in report["budget"]["cut"])
    assert report["onnx_parity"]["passed"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.log", "model.onnx", "report.json"]


def test_calibration_takes_the_samples_its_share_of_the_budget_affords(programs, tmp_path,
                                                                        clock, monkeypatch):
    from compressor.plan import calibration

    real_call = calibration.call

    def timed_call(module, batch):  # the pace probe: 1 s for its samples
        clock.now += 1.0
        return real_call(module, batch)

    monkeypatch.setattr(calibration, "call", timed_call)
    result = compressor.compress(programs["mlp"], fast(finetune={"steps": 0}, max_minutes=2),
                                 out_dir=tmp_path)
    # 120 s - 1 s (the probe) - 60 s kept: a quarter of 59 s at 2 × 0.25 s a sample
    [cut] = result.report["budget"]["cut"]
    taken, wanted = (int(n) for n in re.match(r"calibration on (\d+) of (\d+) samples",
                                             cut).groups())
    assert taken == 29 < wanted
    assert f"calibrating on {taken} of" in (tmp_path / "job.log").read_text()
    assert result.report["onnx_parity"]["passed"]
