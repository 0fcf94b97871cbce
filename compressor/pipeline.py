"""One compression job, top to bottom: the stages, each a call over plain dataclasses.

    load → calibrate → plan → rewrite → fine-tune → export → verify → report

In target mode (`config.target`) the search (`compressor.search`) plans instead, and drives
rewriting and fine-tuning over its candidates until one keeps the target's fidelity.

Each stage lives in its folder (`compressor/<stage>/stage.py`), logs under its one name from
`compressor.vocabulary.JOB_STAGES` and hands the next one what it made: the loaded job, the
plan, the student, the trained student, the exported files, the parity figures.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from compressor.config import CompressionConfig
from compressor.errors import CancelledError, CompressorError, InternalError, JobTimeoutError
from compressor.export.stage import export_, int8_input_scales, staging_folder, verify
from compressor.finetune.stage import finetune
from compressor.load.stage import artifact_bytes, load
from compressor.plan.stage import calibrate_layers, plan
from compressor.report.stage import Result, report
from compressor.rewrite.stage import rewrite
from compressor.runtime.budget import finishing_reserve_s
from compressor.runtime.context import JobContext
from compressor.runtime.failures import known_failure
from compressor.runtime.joblog import JobLog
from compressor.runtime.memory import format_bytes
from compressor.runtime.progress import JobControl, ProgressCallback, StopCheck
from compressor.runtime.resume import RESUME_FOLDER, ResumeFolder
from compressor.search.target import search
from compressor.vocabulary import JOB_LOG_ARTIFACT

__all__ = ["Result", "compress"]


def compress(
    model: str | Path,
    config: CompressionConfig | dict[str, Any] | str | None = None,
    *,
    out_dir: str | Path,
    data: str | Path | None = None,
    progress: ProgressCallback | None = None,
    should_stop: StopCheck | None = None,
) -> Result:
    """Compress the `.pt2` program at `model` and write model.onnx, report.json, job.log.

    `model` may also be a Hugging Face model folder or a .zip / .tar(.gz) of one; then the dense
    result is also written as model-hf.zip (see `compressor.load.huggingface`). `config` is a
    `CompressionConfig`, a dict or JSON (None: all defaults). `data` is an optional
    .safetensors / .npz file of inputs named after the program's inputs (for a checkpoint, also
    .txt / .jsonl text). `progress` receives a
    `ProgressEvent` per update; `should_stop` is polled at every step and a True answer raises
    `CancelledError`; `StopReason.INTERRUPT` stops the job to be run again
    (`InterruptedJobError`), fine-tuning keeping a checkpoint of the step it reached first.
    Every failure raises a `CompressorError` subclass with a stable `code` (an unexpected one is an `InternalError` whose traceback job.log holds under its id);
    artifacts are written atomically, so `out_dir` never holds a half-written file, and
    model.onnx / report.json exist only when the job succeeded. job.log is written either way.
    What the job makes on the way is kept in `out_dir/resume/` (`compressor.runtime.resume`)
    until it succeeds or fails for good: run again with the same `out_dir` after it was
    stopped, timed out or crashed (or killed), the job resumes from what it finds there.
    """
    config = CompressionConfig.parse(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = JobLog(out_dir / JOB_LOG_ARTIFACT)
    control = JobControl(progress, should_stop, config.timeout_s, config.max_minutes)
    try:
        with (log.capture_library_output(),  # torch's and transformers' own noise: to job.log
              staging_folder(out_dir, SCRATCH_FOLDER) as scratch):
            result = _run(Path(model), config, out_dir, None if data is None else Path(data),
                          control, log, scratch)
        shutil.rmtree(out_dir / RESUME_FOLDER, ignore_errors=True)  # done: nothing to resume
        return result
    except CompressorError as exc:
        log.info(f"failed ({exc.code}): {exc.message}")
        _keep_for_a_retry(out_dir, exc, log)
        raise
    except Exception as exc:
        error = known_failure(exc)
        if error is None:
            error = InternalError.wrapping(exc, log.failed_stage)
            log.traceback(exc, error.error_id)
        log.info(f"failed ({error.code}): {error.message}")
        _keep_for_a_retry(out_dir, error, log)
        raise error from exc
    finally:
        log.close()


# What stages hold on disk rather than in memory until the job ends (the original's held-out
# logits of a language model): a folder in out_dir, emptied when a job starts and removed when
# it ends.
SCRATCH_FOLDER = ".scratch"

# Failures a run of the same job again may get past (stopped, out of time, a crash): what the
# job kept is left for it. Any other failure would come again: what it kept goes.
_RETRYABLE = (CancelledError, JobTimeoutError, InternalError)


def _keep_for_a_retry(out_dir: Path, error: CompressorError, log: JobLog) -> None:
    kept = out_dir / RESUME_FOLDER
    if not kept.is_dir():
        return
    if isinstance(error, _RETRYABLE):
        log.info(f"{RESUME_FOLDER}/ keeps what this try made: the job run again with this "
                 "out_dir resumes from it")
    else:
        shutil.rmtree(kept, ignore_errors=True)


def _run(model: Path, config: CompressionConfig, out_dir: Path, data: Path | None,
         control: JobControl, log: JobLog, scratch: Path) -> Result:
    torch.manual_seed(config.finetune.seed)
    log.info(f"config: {config.to_json()}")
    resume = ResumeFolder(out_dir / RESUME_FOLDER, model, data, config.to_dict())
    if resume.path.is_dir():
        log.info(f"{RESUME_FOLDER}/ holds {format_bytes(resume.size_bytes())} kept by an earlier "
                 "try of this job: each product is used only if it checks (inputs, digests)")
    loaded = load(model, data, config, out_dir, control, log)
    resume.reserve_bytes = artifact_bytes(loaded.model_bytes)  # kept products leave it free
    control.budget.reserve_s = finishing_reserve_s(loaded.model_bytes,
                                                   config.export.latency_seconds)
    if control.budget.limited:
        log.info(f"time budget: max_minutes {config.max_minutes:g}, of which "
                 f"{control.budget.reserve_s:.0f} s are kept for export, verification and the "
                 "report; calibration, the search and fine-tuning fit in the rest")
    job = JobContext(loaded.costs, control, log, resume, scratch)
    calibrated = calibrate_layers(loaded, config, job)
    if config.target is None:
        planned = plan(loaded, calibrated, config, job)
        student = rewrite(loaded, planned, config.finetune.grad_reduction, job)
        scales = None if not config.finetune.quantization_aware else int8_input_scales(
            loaded, student, planned.plan, config.export)  # int8 as the export smooths it
        trained = finetune(loaded, planned.plan, student, config.finetune, job,
                           int8_input_scales=scales)
        del student  # `trained` holds it until the export frees it
        export_config, found = config.export, None
    else:
        found = search(loaded, calibrated, config, out_dir, job)
        planned, trained, export_config = found.planned, found.trained, found.export
    del calibrated
    with staging_folder(out_dir) as staging:
        exported = export_(loaded, planned.plan, trained, export_config, staging, job,
                           None if found is None else found.scored_file)
        verified = verify(exported, trained, loaded, export_config, job, config.target)
        return report(config, loaded, planned.plan, trained, exported, verified, found,
                      out_dir, job)
