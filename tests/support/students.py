"""A tiny model's original and its student as the pipeline initializes it, for tests that
look inside fine-tuning."""

from pathlib import Path

from compressor.config import CompressionConfig
from compressor.load.stage import load
from compressor.plan.stage import calibrate_layers, plan
from compressor.rewrite.stage import build_student
from compressor.runtime.context import JobContext
from compressor.runtime.joblog import JobLog
from compressor.runtime.progress import JobControl
from tests.support.tiny_checkpoints import save_checkpoint
from tests.support.tiny_models import make_pt2

# Hugging Face checkpoints (`tiny_checkpoints`); any other kind is a program (`tiny_models`)
CHECKPOINT_KINDS = ("sentence", "classifier", "masked", "llama", "gpt2")


def tiny_student(kind: str, tmp_path: Path, config: dict):
    """Return (loaded job, plan, student as initialized) for a tiny `kind` compressed by
    `config`."""
    if kind in CHECKPOINT_KINDS:
        source = save_checkpoint(kind, tmp_path / kind)
    else:
        source = make_pt2(kind, tmp_path / f"{kind}.pt2")
    parsed = CompressionConfig.parse(config)
    log = JobLog(tmp_path / "job.log")
    control = JobControl(None, None, 3600)
    loaded = load(source, None, parsed, tmp_path, control, log)
    job = JobContext(loaded.costs, control, log)
    planned = plan(loaded, calibrate_layers(loaded, parsed, job), parsed, job)
    return loaded, planned.plan, build_student(loaded, planned, "sum", job)
