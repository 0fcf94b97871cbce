"""A job run again in the same out_dir resumes from the fine-tuning checkpoint it kept, and ends
with the very artifact an uninterrupted run makes; a damaged or foreign checkpoint is discarded."""

import errno
import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import compressor
from compressor.errors import CancelledError, InterruptedJobError
from compressor.finetune import checkpoints as checkpoints_module
from compressor.finetune.checkpoints import FinetuneCheckpoints, TrainingState
from compressor.runtime import resume as resume_module
from compressor.runtime.progress import StopReason
from compressor.runtime.resume import UntrustedProduct, read_product, write_product
from compressor.vocabulary import RESUME_FOLDER, sha256_of
from tests.support.tiny_models import make_pt2

pytestmark = pytest.mark.slow

# Checkpoints after steps 2, 4 and 6, and a finished one after step 8. Warm-up spans every
# step, so each step's learning rate differs: a resume that lost the schedule would show.
CONFIG = {"ratio": 0.5, "finetune": {"steps": 8, "eval_every": 2, "checkpoint_every": 2},
          "export": {"latency_seconds": 0}}

# Run a job and SIGKILL its own process when step 5 is reported (after step 4's checkpoint).
_KILLED_AT_STEP_5 = """
import json, os, signal, sys
import compressor

def progress(event):
    if event.stage == "finetuning" and event.message.startswith("step 5/"):
        os.kill(os.getpid(), signal.SIGKILL)

compressor.compress(sys.argv[1], json.loads(sys.argv[2]), out_dir=sys.argv[3], progress=progress)
"""


def stopping_at(stage: str, message_start: str = ""):
    """Return a progress callback and a stop check that stops the job at that event."""
    seen = []

    def progress(event):
        if event.stage == stage and event.message.startswith(message_start):
            seen.append(event)

    return progress, lambda: bool(seen)


def product_folder(out_dir: Path) -> Path:
    (folder,) = (out_dir / RESUME_FOLDER).glob("finetune-*")
    return folder


@pytest.fixture(scope="module")
def program(tmp_path_factory):
    return make_pt2("mlp", tmp_path_factory.mktemp("resume") / "mlp.pt2")


@pytest.fixture(scope="module")
def uninterrupted(program, tmp_path_factory) -> str:
    """The sha256 of model.onnx of the job run once, start to end."""
    out = tmp_path_factory.mktemp("uninterrupted")
    result = compressor.compress(program, CONFIG, out_dir=out)
    assert not (out / RESUME_FOLDER).exists()  # the job succeeded: nothing kept
    return sha256_of(result.model_path)


@pytest.fixture(scope="module")
def stopped(program, tmp_path_factory) -> Path:
    """The out_dir of the job stopped when step 5 was reported (its checkpoint: step 4)."""
    out = tmp_path_factory.mktemp("stopped")
    progress, stop = stopping_at("finetuning", "step 5/")
    with pytest.raises(CancelledError):
        compressor.compress(program, CONFIG, out_dir=out, progress=progress, should_stop=stop)
    return out


def test_a_job_killed_mid_finetuning_resumes_from_its_checkpoint_with_the_same_artifact(
        program, uninterrupted, tmp_path):
    killed = subprocess.run(
        [sys.executable, "-c", _KILLED_AT_STEP_5, str(program), json.dumps(CONFIG),
         str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    record = json.loads((product_folder(tmp_path) / "product.json").read_text())
    assert (record["step"], record["finished"]) == (4, False)
    result = compressor.compress(program, CONFIG, out_dir=tmp_path)
    log = result.log_path.read_text()
    assert "fine-tuning: resumed after step 4 of 8 from its checkpoint" in log
    assert "fine-tuning checkpoint at step 2:" not in log  # steps 1-4 were not taken again
    assert "calibration: reused 2 of 2 layers' prepared products" in log
    assert "rewriting: reused θ as an earlier try corrected it" in log
    assert result.report["finetune"]["resumed_at_step"] == 4
    assert sha256_of(result.model_path) == uninterrupted
    assert not (tmp_path / RESUME_FOLDER).exists()


def test_a_job_stopped_after_finetuning_does_not_train_again(program, uninterrupted, tmp_path):
    progress, stop = stopping_at("exporting")
    with pytest.raises(CancelledError):
        compressor.compress(program, CONFIG, out_dir=tmp_path, progress=progress,
                            should_stop=stop)
    result = compressor.compress(program, CONFIG, out_dir=tmp_path)
    log = result.log_path.read_text()
    assert "fine-tuning: a finished run was kept (step 8 of 8)" in log
    assert "fine-tuning checkpoint at step" not in log
    assert sha256_of(result.model_path) == uninterrupted


def test_a_job_stopped_in_calibration_keeps_the_layers_it_prepared(
        program, uninterrupted, tmp_path):
    progress, stop = stopping_at("calibrating", "decomposing layer 2/")
    with pytest.raises(CancelledError):
        compressor.compress(program, CONFIG, out_dir=tmp_path, progress=progress,
                            should_stop=stop)
    assert len(list((tmp_path / RESUME_FOLDER / "calibration").iterdir())) == 1
    result = compressor.compress(program, CONFIG, out_dir=tmp_path)
    log = result.log_path.read_text()
    assert "calibration: reused 1 of 2 layers' prepared products" in log
    assert sha256_of(result.model_path) == uninterrupted


def test_a_job_stopped_to_run_again_keeps_a_checkpoint_of_the_step_it_reached(
        program, uninterrupted, stopped, tmp_path):
    # `stopped` was cancelled (True) when step 5 was reported: no checkpoint beyond step 4.
    record = json.loads((product_folder(stopped) / "product.json").read_text())
    assert record["step"] == 4
    progress, stop = stopping_at("finetuning", "step 5/")
    with pytest.raises(InterruptedJobError):
        compressor.compress(program, CONFIG, out_dir=tmp_path, progress=progress,
                            should_stop=lambda: StopReason.INTERRUPT if stop() else False)
    record = json.loads((product_folder(tmp_path) / "product.json").read_text())
    assert (record["step"], record["finished"]) == (5, False)
    assert "fine-tuning stopped after step 5 to be run again: checkpoint kept first" in (
        tmp_path / "job.log").read_text()
    result = compressor.compress(program, CONFIG, out_dir=tmp_path)
    assert "fine-tuning: resumed after step 5 of 8" in result.log_path.read_text()
    assert sha256_of(result.model_path) == uninterrupted


def test_settings_that_cannot_change_the_result_do_not_stop_a_resume(
        program, uninterrupted, stopped, tmp_path):
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    config = json.loads(json.dumps(CONFIG))
    config["finetune"].update(checkpoint_every=3, checkpoint_minutes=30)
    # a longer timeout, with the budget the first run had (three quarters of the default
    # timeout: a budget follows the timeout only when not given, and a budget is an input)
    config.update(timeout_s=7200, max_minutes=45)
    result = compressor.compress(program, config, out_dir=tmp_path)
    assert "resumed after step 4 of 8" in result.log_path.read_text()
    assert sha256_of(result.model_path) == uninterrupted


def _flip_a_byte(folder: Path) -> None:
    (tensors,) = folder.glob("tensors-*.safetensors")
    data = bytearray(tensors.read_bytes())
    data[-3] ^= 0xFF
    tensors.write_bytes(bytes(data))


def _truncate(folder: Path) -> None:
    (tensors,) = folder.glob("tensors-*.safetensors")
    tensors.write_bytes(tensors.read_bytes()[:-100])


def _half_written_record(folder: Path) -> None:
    record = folder / "product.json"
    record.write_text(record.read_text()[:50])


def _made_for_other_inputs(folder: Path) -> None:
    record = json.loads((folder / "product.json").read_text())
    record["key"] = "0" * 64
    (folder / "product.json").write_text(json.dumps(record))


@pytest.mark.parametrize("damage,reason", [
    (_flip_a_byte, "truncated or altered"),
    (_truncate, "truncated or altered"),
    (_half_written_record, "product.json cannot be read"),
    (_made_for_other_inputs, "made for other inputs"),
])
def test_a_damaged_or_foreign_checkpoint_is_discarded_and_the_job_starts_over(
        program, uninterrupted, stopped, tmp_path, damage, reason):
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    damage(product_folder(tmp_path))
    result = compressor.compress(program, CONFIG, out_dir=tmp_path)
    log = result.log_path.read_text()
    assert "discarded" in log and reason in log
    assert "resumed" not in log and "fine-tuning checkpoint at step 2:" in log
    assert sha256_of(result.model_path) == uninterrupted  # from scratch, as deterministic


def test_a_product_stays_whole_when_its_next_write_is_cut_short(tmp_path):
    first = {"a": torch.arange(4.0)}
    write_product(tmp_path, "key", first, {"step": 1})
    # As if killed mid-way through the next write: its tensors are in place, its record not yet.
    (tmp_path / "tensors-cut.safetensors").write_bytes(b"partial")
    (tmp_path / ".product.json.tmp").write_text("{")
    path, record = read_product(tmp_path, "key")
    assert record["step"] == 1 and path.name != "tensors-cut.safetensors"
    with pytest.raises(UntrustedProduct, match="other inputs"):
        read_product(tmp_path, "another key")
    write_product(tmp_path, "key", {"a": torch.ones(4)}, {"step": 2})
    assert sorted(p.name for p in tmp_path.iterdir() if p.suffix != ".json") == [
        p.name for p in tmp_path.glob("tensors-*")]  # the leftovers are gone
    assert len(list(tmp_path.glob("tensors-*"))) == 1
    assert read_product(tmp_path, "key")[1]["step"] == 2
    assert read_product(tmp_path / "none", "key") is None


def _state(param: nn.Parameter, step: int) -> TrainingState:
    optimizer = torch.optim.AdamW([param])
    param.grad = torch.ones_like(param)
    optimizer.step()
    return TrainingState.capture(
        step=step, finished=False, params=[param], best_theta=[param.detach().clone()],
        best=1.0, best_step=0, lr_scale=1.0, history=[], optimizer=optimizer,
        sampler=torch.Generator(), device=torch.device("cpu"))


def test_a_checkpoint_the_disk_cannot_take_turns_checkpoints_off_not_the_job(
        tmp_path, monkeypatch):
    lines, param = [], nn.Parameter(torch.ones(3))
    checkpoints = FinetuneCheckpoints(tmp_path / "run", "key", 1, 600, lines.append)
    checkpoints.save(_state(param, 1))

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints_module, "write_product", full_disk)
    checkpoints.save(_state(param, 2))
    assert "checkpoints off for the rest of this run: one was not written (No space" in lines[-1]
    assert not checkpoints.due(3)
    assert checkpoints.load([param]).step == 1  # the last one kept is whole, and still used

    monkeypatch.undo()
    monkeypatch.setattr(resume_module, "free_disk_bytes", lambda folder: 100)
    low = FinetuneCheckpoints(tmp_path / "low", "key", 1, 600, lines.append)
    low.save(_state(param, 1))
    assert "the disk has 100 B free" in lines[-1] and not (tmp_path / "low").exists()


def test_a_damaged_calibration_product_is_prepared_again(
        program, uninterrupted, stopped, tmp_path):
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    first, _ = sorted((tmp_path / RESUME_FOLDER / "calibration").iterdir())
    _truncate(first)
    result = compressor.compress(program, CONFIG, out_dir=tmp_path)
    log = result.log_path.read_text()
    assert "calibration: the kept product of layer" in log and "truncated or altered" in log
    assert "calibration: reused 1 of 2 layers' prepared products" in log
    assert "resumed after step 4 of 8" in log  # the same decomposition: the plan still matches
    assert sha256_of(result.model_path) == uninterrupted


def test_a_damaged_initialization_is_corrected_again(program, uninterrupted, stopped, tmp_path):
    shutil.copytree(stopped, tmp_path, dirs_exist_ok=True)
    (kept,) = (tmp_path / RESUME_FOLDER).glob("rewrite-*")
    _flip_a_byte(kept)
    result = compressor.compress(program, CONFIG, out_dir=tmp_path)
    log = result.log_path.read_text()
    assert "rewriting: the kept θ discarded" in log and "sequential correction on" in log
    assert "resumed after step 4 of 8" in log
    assert sha256_of(result.model_path) == uninterrupted
