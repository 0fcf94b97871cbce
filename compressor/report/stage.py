"""The reporting stage: latency of the original and the artifact, the artifacts moved into the
job's folder, and report.json, which holds every figure the job measured."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from compressor.config import CompressionConfig
from compressor.export.onnx import move_onnx, onnx_bytes
from compressor.export.stage import ExportedJob
from compressor.finetune.stage import TrainedJob
from compressor.load.data import Dataset
from compressor.load.stage import LoadedJob
from compressor.plan.planning import Plan
from compressor.report import figures
from compressor.runtime.context import JobContext
from compressor.runtime.costs import SampleCosts
from compressor.runtime.joblog import JobLog
from compressor.runtime.memory import format_bytes
from compressor.runtime.outputs import OutputFidelity
from compressor.vocabulary import (
    HF_ARTIFACT,
    JOB_LOG_ARTIFACT,
    ONNX_ARTIFACT,
    ONNX_DATA_ARTIFACT,
    REPORT_ARTIFACT,
    REPORTING,
)

# The batch sizes latency is measured at.
LATENCY_BATCHES = (1, 32)


@dataclass(frozen=True)
class Result:
    """What a finished job leaves in `out_dir`."""

    out_dir: Path
    model_path: Path  # out_dir / "model.onnx"
    report_path: Path  # out_dir / "report.json"
    log_path: Path  # out_dir / "job.log"
    report: dict[str, Any]


def report(config: CompressionConfig, loaded: LoadedJob, plan: Plan, trained: TrainedJob,
           exported: ExportedJob, parity: dict[str, Any],
           artifact_fidelity: list[OutputFidelity] | None, out_dir: Path,
           job: JobContext) -> Result:
    """Measure latency, move the artifacts into `out_dir`, end the log and write report.json."""
    with job.log.stage(REPORTING):
        job.control.report(REPORTING, 0.0, "measuring latency")
        measured = {**exported.sizes,
                    **latency_figures(exported.original, loaded.held_out, exported.model,
                                      config.export.latency_seconds, job.costs)}
        if exported.huggingface_zip.exists():
            os.replace(exported.huggingface_zip, out_dir / HF_ARTIFACT)
        move_onnx(exported.model, out_dir / ONNX_ARTIFACT)
    job.control.report(REPORTING, 1.0, "done")
    job.log.info("succeeded")
    job.log.close()
    names = loaded.output_names
    fidelity = {"initialization": figures.fidelity_dict(trained.initial, names),
                "final": figures.fidelity_dict(trained.final, names)}
    if artifact_fidelity is not None:
        fidelity["artifact"] = figures.fidelity_dict(artifact_fidelity, names)
    document = {
        "status": "succeeded",
        "config": config.to_dict(),
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)}
                   for s in loaded.specs],
        "data": _data_figures(loaded.train, loaded.held_out),
        "plan": _plan_with_errors(plan, trained.layer_errors),
        **measured,
        "fidelity": fidelity,
        "finetune": asdict(trained.summary),
        "onnx_parity": parity,
        "stage_seconds": job.log.stage_seconds,
        "memory": _memory_figures(job.log, loaded.model_bytes),
        "versions": figures.versions(),
        "artifacts": {name: {"size": (out_dir / name).stat().st_size,
                             "sha256": figures.sha256_of(out_dir / name)}
                      for name in (ONNX_ARTIFACT, ONNX_DATA_ARTIFACT, HF_ARTIFACT,
                                   JOB_LOG_ARTIFACT)
                      if (out_dir / name).is_file()},
    }
    figures.write_json_atomic(out_dir / REPORT_ARTIFACT, document)
    return Result(out_dir, out_dir / ONNX_ARTIFACT, out_dir / REPORT_ARTIFACT,
                  out_dir / JOB_LOG_ARTIFACT, document)


def latency_figures(original_path: Path | None, held_out: Dataset, artifact_path: Path,
                    seconds: float, costs: SampleCosts) -> dict[str, Any]:
    """Return the ONNX file sizes and onnxruntime latency, before (the original's export at
    `original_path`, None when latency is not measured) and after, `seconds` per figure.
    Batch sizes whose one run would pass `compressor.runtime.costs.LATENCY_FLOPS` are left
    out, and listed as such."""
    latency: dict[str, Any] = {"original": {}, "compressed": {}, "seconds_per_figure": seconds,
                               "runtime": "onnxruntime CPUExecutionProvider, median"}
    sizes: dict[str, int | None] = {"original": None, "artifact": onnx_bytes(artifact_path)}
    if original_path is None or seconds <= 0:
        return {"onnx_bytes": sizes, "latency": latency}
    sizes["original"] = onnx_bytes(original_path)
    kept, left_out = costs.latency_batches(LATENCY_BATCHES)
    if left_out:
        per_sample = costs.activation_bytes_per_sample + costs.output_bytes_per_sample
        latency["left_out"] = {
            f"batch_{b}_ms": f"one run would cost {b * costs.flops_per_sample / 1e12:.2g} TFLOP "
                             f"and {format_bytes(b * per_sample)} of activations"
            for b in left_out}
    for batch_size in kept:
        batch = held_out.take(torch.arange(batch_size) % len(held_out))
        key = f"batch_{batch_size}_ms"
        latency["original"][key] = figures.onnx_latency_ms(original_path, batch, seconds)
        latency["compressed"][key] = figures.onnx_latency_ms(artifact_path, batch, seconds)
    return {"onnx_bytes": sizes, "latency": latency}


def _data_figures(train: Dataset, held_out: Dataset) -> dict[str, Any]:
    note = ({"note": "no data file was given: inputs were sampled to match the program's "
                     "example inputs, so fidelity is measured on synthetic inputs"}
            if train.synthetic else {})
    return {"source": train.source, "synthetic": train.synthetic,
            "train_samples": len(train), "held_out_samples": len(held_out), **note}


def _plan_with_errors(plan: Plan, errors: dict[str, dict[str, float]]) -> dict[str, Any]:
    planned = plan.to_dict()
    for entry in planned["layers"]:
        entry.update(errors.get(entry["name"], {}))
    return planned


def _memory_figures(log: JobLog, model_bytes: int) -> dict[str, Any]:
    peaks = log.stage_peak_rss_bytes
    return {"stage_peak_rss_bytes": peaks, "model_bytes": model_bytes,
            "peak_per_model_byte": max(peaks.values()) / max(1, model_bytes)}
