"""What a job keeps for a retry is bounded up front: the disk estimate counts it, and a job whose
products would not fit is refused before it loads anything."""

from __future__ import annotations

from pathlib import Path

import pytest

import compressor
from compressor.config import CompressionConfig
from compressor.errors import ResourceError
from compressor.load import stage as load_stage
from compressor.load.stage import artifact_bytes, check_resources, theta_share
from compressor.runtime.memory import loaded_weight_bytes
from compressor.runtime.resume import kept_bytes_estimate
from compressor.vocabulary import RESUME_FOLDER
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
