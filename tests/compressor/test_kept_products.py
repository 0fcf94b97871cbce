"""What a job keeps for a retry is bounded up front: the disk estimate counts it, and a job whose
products would not fit is refused before it loads anything."""

from __future__ import annotations

from pathlib import Path

import pytest

import compressor
import compressor.errors
from compressor.config import CompressionConfig
from compressor.errors import ResourceError
from compressor.load import stage as load_stage
from compressor.load.stage import artifact_bytes, check_resources, theta_share
from compressor.runtime.memory import loaded_weight_bytes
from compressor.runtime.resume import kept_bytes_estimate
from compressor.search.scout import Scout
from compressor.vocabulary import RESUME_FOLDER, sha256_of
from tests.support.search import unmeasured
from tests.support.tiny_models import make_pt2

RATIO_JOB = {"ratio": 0.5, "finetune": {"steps": 8, "checkpoint_every": 2}}


@pytest.fixture(scope="module")
def program(tmp_path_factory) -> Path:
    return make_pt2("mlp", tmp_path_factory.mktemp("kept") / "mlp.pt2")


def disk_needed(program: Path, config: dict) -> int:
    """The free disk the job needs by the estimate: its artifacts and what it keeps."""
    weights = loaded_weight_bytes(program)
    parsed = CompressionConfig.parse(config)
    kept = kept_bytes_estimate(weights, theta_share(parsed),
                               parsed.finetune.checkpoint_every > 0)
    return artifact_bytes(weights) + sum(kept.values())


def with_free_disk(monkeypatch, free: int) -> None:
    monkeypatch.setattr(load_stage, "available_memory_bytes", lambda: None)
    monkeypatch.setattr(load_stage, "free_disk_bytes", lambda folder: free)


def test_the_kept_products_count_toward_the_disk_a_job_needs(program):
    weights = loaded_weight_bytes(program)
    kept = kept_bytes_estimate(weights, 0.5, checkpoints=True)
    # decompositions ≤ the weights, θ ≤ ratio × them, a checkpoint 4 × θ, twice while replaced
    assert kept == {"decompositions": weights, "θ": weights // 2,
                    "fine-tuning checkpoints": 8 * (weights // 2)}
    assert "fine-tuning checkpoints" not in kept_bytes_estimate(weights, 0.5, checkpoints=False)
    assert theta_share(CompressionConfig.parse(RATIO_JOB)) == 0.5
    assert theta_share(CompressionConfig.parse({})) == 1.0  # target mode: up to every weight
    overridden = {"ratio": 0.2, "overrides": [{"match": "*", "method": {"name": "lowrank",
                                                                         "rank": 8}}]}
    assert theta_share(CompressionConfig.parse(overridden)) == 1.0


@pytest.mark.parametrize("spare,refused", [(-1, True), (0, False)])
def test_a_job_whose_products_would_not_fit_is_refused_up_front(
        program, tmp_path, monkeypatch, spare, refused):
    needed = disk_needed(program, RATIO_JOB)
    with_free_disk(monkeypatch, needed + spare)
    config = CompressionConfig.parse(RATIO_JOB)
    if not refused:
        check_resources(program, tmp_path, config)
        return
    with pytest.raises(ResourceError) as caught:
        check_resources(program, tmp_path, config)
    message = caught.value.message
    assert caught.value.code == "insufficient_resources"
    assert "what it keeps for a retry" in message and "fine-tuning checkpoints" in message
    assert "finetune.checkpoint_every 0" in message  # what to do about it
    # Without checkpoints the same disk is enough: the estimate follows the config.
    check_resources(program, tmp_path, CompressionConfig.parse(
        {**RATIO_JOB, "finetune": {"steps": 8, "checkpoint_every": 0}}))


def test_a_refused_job_fails_before_loading_and_keeps_nothing(program, tmp_path, monkeypatch):
    with_free_disk(monkeypatch, disk_needed(program, RATIO_JOB) - 1)
    out = tmp_path / "out"
    with pytest.raises(ResourceError):
        compressor.compress(program, RATIO_JOB, out_dir=out)
    log = (out / "job.log").read_text()
    assert "failed (insufficient_resources)" in log and "what it keeps for a retry" in log
    assert not (out / RESUME_FOLDER).exists() and not (out / "model.onnx").exists()


# Target mode on the tiny MLP scored as a regression: every candidate meets relative L2 10.
TARGET_JOB = {"finetune": {"steps": 8, "eval_every": 2, "checkpoint_every": 2,
                           "loss": "regression"},
              "min_layer_params": 0, "export": {"latency_seconds": 0},
              "data": {"synthetic_samples": 64}, "target": {"relative_l2": 10.0}}


def run(program: Path, config: dict, out: Path, stop_at: tuple[str, str, int] | None = None):
    """Run the job; with `stop_at` (stage, message start, n), stop it at the n-th such event.
    Return the result (None when stopped) and every progress message, by stage."""
    events: list[tuple[str, str]] = []
    seen = [0]

    def progress(event) -> None:
        events.append((event.stage, event.message))
        if stop_at and event.stage == stop_at[0] and event.message.startswith(stop_at[1]):
            seen[0] += 1

    def stop() -> bool:
        return stop_at is not None and seen[0] >= stop_at[2]

    try:
        return compressor.compress(program, config, out_dir=out, progress=progress,
                                   should_stop=stop), events
    except compressor.errors.CancelledError:
        return None, events


def scorings(events: list[tuple[str, str]]) -> list[str]:
    return [message for _, message in events if message.startswith("scoring the candidate")
            or message.startswith("scoring the original")]


@pytest.mark.slow
def test_a_retried_target_job_does_not_score_its_candidates_again(program, tmp_path):
    plain, plain_events = run(program, TARGET_JOB, tmp_path / "plain")
    assert scorings(plain_events)  # the search scored its candidates
    # Stopped as the first finalist starts fine-tuning: the search is over, its outcome kept.
    stopped, _ = run(program, TARGET_JOB, tmp_path / "retried", ("finetuning", "", 1))
    assert stopped is None
    retried, events = run(program, TARGET_JOB, tmp_path / "retried")
    log = retried.log_path.read_text()
    assert scorings(events) == []  # nothing scored again
    assert "sensitivities reused from an earlier try" in log
    candidates = len(plain.report["target"]["candidates"])
    assert f"target: reused the {candidates} candidates an earlier try scored" in log
    resumed = [message for stage, message in events if message.startswith("resumed")]
    assert resumed[-1].startswith("resumed; reused: decompositions (")
    assert f"sensitivities, the search's {candidates} scored candidates" in resumed[-1]
    assert unmeasured(retried.report["target"]) == unmeasured(plain.report["target"])
    assert sha256_of(retried.model_path) == sha256_of(plain.model_path)
    assert not (tmp_path / "retried" / RESUME_FOLDER).exists()


@pytest.mark.slow
def test_a_finalist_that_missed_is_not_fine_tuned_again_and_its_products_go(program, tmp_path,
                                                                           monkeypatch):
    # Fine-tuning adds nothing at 0 steps: a finalist within reach of the floor misses it. int4
    # of the original is not scored: on this MLP it keeps the floor below which int4 on a
    # budget would be the near miss, at fewer bytes, and the int4 walk stops at it.
    scored = Scout._original_quantized
    monkeypatch.setattr(Scout, "_original_quantized", lambda self, candidates, plans, dense, q:
                        None if q == "int4" else scored(self, candidates, plans, dense, q))
    config = {**TARGET_JOB, "finetune": {"steps": 0, "loss": "regression"}}
    easy, _ = run(program, config, tmp_path / "easy")
    floats = [c for c in easy.report["target"]["candidates"]
              if c["quantize"] is None and c["method"] == "lowrank"]
    errors = [c["fidelity"]["output_0"]["relative_l2"] for c in floats]
    config["target"] = {"relative_l2": (errors[0] + errors[1]) / 2}  # only the largest meets
    # (the budgets are scored largest first)
    plain, _ = run(program, config, tmp_path / "plain")
    missed = [t for t in plain.report["target"]["tries"] if not t["meets_floor"]]
    assert missed, "no finalist missed: the test needs a floor within reach"
    # Stopped as the finalist after the first one starts fine-tuning: the first one's miss is kept.
    stopped, _ = run(program, config, tmp_path / "retried", ("finetuning", "", 2))
    assert stopped is None
    kept = tmp_path / "retried" / RESUME_FOLDER
    assert len(list(kept.glob("search-tries-*"))) == 1
    assert len(list(kept.glob("rewrite-*"))) <= 1  # the missed finalist's θ went
    retried, events = run(program, config, tmp_path / "retried")
    log = retried.log_path.read_text()
    assert "missed the floor after fine-tuning in an earlier try: not fine-tuned again" in log
    assert scorings(events) == []
    trained = [t for t in plain.report["target"]["tries"] if not t["fine_tuned"].startswith("not")]
    assert sum(stage == "finetuning" and not message for stage, message in events) == len(
        trained) - 1  # the missed finalist is not fine-tuned again
    assert retried.report["target"]["tries"] == plain.report["target"]["tries"]
    assert sha256_of(retried.model_path) == sha256_of(plain.model_path)


def test_damaged_kept_sensitivities_are_measured_again(tmp_path):
    from compressor.runtime.resume import KeptRecord, ResumeFolder

    model = tmp_path / "model.bin"
    model.write_bytes(b"weights")
    resume = ResumeFolder(tmp_path / RESUME_FOLDER, model, None, {"ratio": 0.5})
    lines: list[str] = []
    record = KeptRecord(resume, "sensitivities-0", ("plan",), "sensitivities", lines.append)
    record.save({"fc1": 0.25, "fc2": float("inf")})
    assert record.load() == {"fc1": 0.25, "fc2": float("inf")}
    other = KeptRecord(resume, "sensitivities-0", ("another plan",), "sensitivities",
                       lines.append)
    assert other.load() is None and "made for other inputs" in lines[-1]
    assert not record.folder.exists()  # discarded: the next write starts afresh


def test_a_disk_that_fills_up_during_the_job_fails_it_as_insufficient_resources(
        program, tmp_path, monkeypatch):
    # Not an internal error: the user is told what ran out and what to do, and no artifact is
    # left half-written.
    import errno

    from compressor.export import stage

    def export_onnx(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "model.onnx"))

    monkeypatch.setattr(stage, "export_onnx", export_onnx)
    out = tmp_path / "out"
    with pytest.raises(ResourceError) as caught:
        compressor.compress(program, {**RATIO_JOB, "finetune": {"steps": 0}}, out_dir=out)
    assert caught.value.code == "insufficient_resources"
    assert caught.value.message.startswith(
        "the disk filled up while the job ran (No space left on device writing model.onnx): "
        "free space")
    assert str(tmp_path) not in caught.value.message
    assert "failed (insufficient_resources): the disk filled up" in (out / "job.log").read_text()
    assert not (out / "model.onnx").exists() and not (out / "report.json").exists()
