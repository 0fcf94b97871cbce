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
from compressor.export.stage import Baseline, ExportedJob, VerifiedJob
from compressor.finetune.stage import TrainedJob
from compressor.load.data import Dataset
from compressor.load.stage import LoadedJob
from compressor.plan.planning import Plan
from compressor.report import figures
from compressor.runtime.budget import LATENCY_LONGEST_MULTIPLE, LATENCY_MIN_RUNS
from compressor.runtime.context import JobContext
from compressor.runtime.costs import SampleCosts
from compressor.runtime.joblog import JobLog
from compressor.runtime.memory import format_bytes, shortfall
from compressor.runtime.outputs import FIGURE_LABELS, judged_figure
from compressor.search.scout import SIZE_TIE
from compressor.search.target import SearchResult
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
# What an onnxruntime CPU session holds, per byte of its ONNX file, at its peak as it loads
# (Gemma-3 270M: 2.3 GiB for its 1.07 GB export, 0.45 GiB for the 270 MB int8 one; four of its
# files held 4.7 GiB at once), with a margin.
SESSION_PEAK_PER_FILE_BYTE = 2.5
# Where each baseline (onnxruntime's quantization of the original) goes in the report, and its
# latency in `latency`.
_BASELINE_KEYS = {"int8": "baseline", "int4": "baseline_int4"}
_BASELINE_WHAT = {
    "int8": "onnxruntime dynamic int8 quantization of the original (quantize_dynamic, per "
            "channel): what a user could pick instead, measured on the same held-out inputs",
    "int4": "onnxruntime int4 weight-only quantization of the original (MatMulNBitsQuantizer "
            "with its defaults: MatMul weights in blocks of 128, asymmetric; Gemm rewritten as "
            "MatMul first, as quantize_dynamic does): what a user could pick instead, measured "
            "on the same held-out inputs",
}


@dataclass(frozen=True)
class Result:
    """What a finished job leaves in `out_dir`."""

    out_dir: Path
    model_path: Path  # out_dir / "model.onnx"
    report_path: Path  # out_dir / "report.json"
    log_path: Path  # out_dir / "job.log"
    report: dict[str, Any]


def report(config: CompressionConfig, loaded: LoadedJob, plan: Plan, trained: TrainedJob,
           exported: ExportedJob, verified: VerifiedJob, found: SearchResult | None,
           out_dir: Path, job: JobContext) -> Result:
    """Measure latency, move the artifacts into `out_dir`, end the log and write report.json."""
    baselines = verified.baselines
    with job.log.stage(REPORTING):
        job.control.report(REPORTING, 0.0, "measuring latency")
        measured = {**exported.sizes,
                    **latency_figures(exported.original, loaded.held_out, exported.model,
                                      config.export.latency_seconds, job.costs,
                                      {_BASELINE_KEYS[q]: b.model for q, b in baselines.items()
                                       if b.model is not None})}
        if exported.huggingface_zip.exists():
            os.replace(exported.huggingface_zip, out_dir / HF_ARTIFACT)
        move_onnx(exported.model, out_dir / ONNX_ARTIFACT)
    job.control.report(REPORTING, 1.0, "done")
    job.log.info("succeeded")
    job.log.close()
    names = loaded.output_names
    fidelity = {"initialization": figures.fidelity_dict(trained.initial, names),
                "final": figures.fidelity_dict(trained.final, names)}
    if verified.artifact_fidelity is not None:
        fidelity["artifact"] = figures.fidelity_dict(verified.artifact_fidelity, names)
    baseline_figures = {_BASELINE_KEYS[q]: _baseline_figures(b, measured["latency"], names)
                        for q, b in baselines.items()}
    outcome = outcome_of(measured, fidelity.get("artifact", fidelity["final"]), baseline_figures,
                         found)
    document = {
        "status": "succeeded",
        "outcome": outcome,
        "warnings": outcome.pop("warnings"),
        "config": config.to_dict(),
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)}
                   for s in loaded.specs],
        "data": _data_figures(loaded.train, loaded.held_out),
        "plan": _plan_with_errors(plan, trained.layer_errors),
        **measured,
        "fidelity": fidelity,
        "finetune": asdict(trained.summary),
        "onnx_parity": verified.parity,
        **baseline_figures,
        **({"target": found.summary()} if found is not None else {}),
        "budget": job.control.budget.summary(),
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
                    seconds: float, costs: SampleCosts,
                    baselines: dict[str, Path] | None = None) -> dict[str, Any]:
    """Return the ONNX file sizes and onnxruntime latency, before (the original's export at
    `original_path`, None when latency is not measured) and after, `seconds` per figure, and
    the `baselines`' (quantizations of the original, by report key) when there are any. Batch sizes
    whose one run would pass `compressor.runtime.costs.LATENCY_FLOPS` are left out, and listed
    as such. A figure's runs go on past `seconds` until each file has `LATENCY_MIN_RUNS`,
    unless that takes `LATENCY_LONGEST_MULTIPLE` × `seconds`."""
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
    paths = {"original": original_path, "compressed": artifact_path, **(baselines or {})}
    together = _sessions_fit(paths)
    latency["timed"] = ("in turn, every file's session open at once" if together else
                        "in pairs, each file in turn with the artifact (its timing scaled by "
                        "the artifact's in its pair over the artifact's in the first): the "
                        "machine lacks the memory to open every file's onnxruntime session "
                        "at once")
    quartiles: dict[str, dict[str, list[float]]] = {name: {} for name in paths}
    runs: dict[str, dict[str, int]] = {name: {} for name in paths}
    longest = LATENCY_LONGEST_MULTIPLE * seconds
    for batch_size in kept:
        batch = held_out.take(torch.arange(batch_size) % len(held_out))
        key = f"batch_{batch_size}_ms"
        timed = (figures.onnx_latencies_ms(paths, batch, seconds, LATENCY_MIN_RUNS, longest)
                 if together else
                 figures.onnx_latencies_in_pairs("compressed", paths, batch, seconds,
                                                 LATENCY_MIN_RUNS, longest))
        for name, timing in timed.items():
            latency.setdefault(name, {})[key] = timing.median
            quartiles[name][key] = list(timing.quartiles)
            runs[name][key] = timing.runs
    latency["quartiles"] = quartiles
    latency["runs"] = runs
    return {"onnx_bytes": sizes, "latency": latency}


def _sessions_fit(paths: dict[str, Path]) -> bool:
    """Whether the machine has the memory to open an onnxruntime session of every file at
    `paths` at once (`SESSION_PEAK_PER_FILE_BYTE`)."""
    needed = int(SESSION_PEAK_PER_FILE_BYTE * sum(onnx_bytes(path) for path in paths.values()))
    return shortfall(needed, "timing every file at once") is None


def _baseline_figures(baseline: Baseline, latency: dict[str, Any],
                      names: list[str]) -> dict[str, Any]:
    what = _BASELINE_WHAT[baseline.quantize]
    if baseline.error is not None:
        return {"what": what, "error": baseline.error}
    return {"what": what, "onnx_bytes": baseline.bytes,
            "latency": latency.get(_BASELINE_KEYS[baseline.quantize], {}),
            "fidelity": figures.fidelity_dict(baseline.fidelity, names)}


def outcome_of(measured: dict[str, Any], fidelity: dict[str, dict],
               baselines: dict[str, dict], found: SearchResult | None) -> dict[str, Any]:
    """Return how the artifact compares with the original (and the `baselines`, by report
    key: `baseline`, `baseline_int4`): a headline a user reads first (each baseline's size,
    speed and fidelity beside the artifact's), the ratios behind it, and warnings for an
    artifact that is not smaller or not faster than the original, or, in target mode, that a
    baseline keeping the floors beats on the objective."""
    sizes, latency = measured["onnx_bytes"], measured["latency"]
    outcome: dict[str, Any] = {"warnings": []}
    parts = []
    if sizes["original"]:
        ratio = sizes["original"] / max(1, sizes["artifact"])
        outcome["size_ratio"] = ratio
        parts.append(f"{ratio:.2f}× smaller" if ratio > 1 else f"{1 / ratio:.2f}× larger")
        if ratio <= 1:
            outcome["warnings"].append(
                f"the artifact is not smaller than the original ({sizes['artifact']:,} vs "
                f"{sizes['original']:,} bytes): export.form 'dense' keeps the original's shapes; "
                "use a `target` (or export.form 'factorized', export.quantize 'int8')")
    key = max(latency["original"], key=lambda k: int(k.split("_")[1]), default=None)
    if key is not None:
        speedup = _speedup(latency, key)
        tie = _within_timing_noise(latency, key)
        outcome["speedup"] = {"batch": key, "ratio": speedup, "within_noise": tie}
        parts.append(_speed(speedup, tie))
        if speedup < 1 and not tie:
            outcome["warnings"].append(
                f"the artifact is slower than the original at {_batch(key)} "
                f"({latency['compressed'][key]:.3g} vs {latency['original'][key]:.3g} ms)")
    if found is not None:
        outcome["meets_target"] = True
    met = ("" if found is None
           else f"meets the target ({_floors_met(fidelity, found.target.floors())})")
    if parts:
        headline = "the artifact is " + ", ".join(parts) + (f", {met}" if met else "")
    else:  # nothing measured against the original (export.latency_seconds 0)
        headline = f"the artifact {met}" if met else "the artifact is verified"
    for quantize, name in _BASELINE_KEYS.items():
        baseline = baselines.get(name)
        if baseline is None or not baseline.get("onnx_bytes") or not sizes["original"]:
            continue
        speed = "" if key is None or key not in latency.get(name, {}) else _speed(
            _speedup(latency, key, name), _within_timing_noise(latency, key, name)) + ", "
        headline += (f"; onnxruntime {quantize} of the original: "
                     f"{sizes['original'] / baseline['onnx_bytes']:.2f}× smaller, {speed}"
                     f"{_floors_met(baseline['fidelity'], None)}")
        if found is not None and found.target.met_by(baseline["fidelity"]):
            beaten = _beaten_by(found.target.objective, quantize, name, baseline, sizes,
                                latency, key)
            if beaten:
                outcome["warnings"].append(beaten)
    outcome["headline"] = headline
    return outcome


def _batch(key: str) -> str:
    """Return a latency key (`batch_32_ms`) in words (`batch 32`)."""
    return key.removesuffix("_ms").replace("_", " ")


def _speedup(latency: dict[str, Any], key: str, name: str = "compressed") -> float:
    """Return how many times faster than the original `name` (the artifact, or a baseline)
    runs at `key`."""
    return latency["original"][key] / max(1e-9, latency[name][key])


def _speed(speedup: float, within_noise: bool) -> str:
    """Return how fast a model runs against the original, in words."""
    if within_noise:
        return f"as fast as the original ({speedup:.2f}×, within timing noise)"
    return f"{speedup:.2f}× faster" if speedup >= 1 else f"{1 / speedup:.2f}× slower"


def _beaten_by(objective: str, quantize: str, name: str, baseline: dict[str, Any],
               sizes: dict[str, int], latency: dict[str, Any], key: str | None) -> str | None:
    """Return a warning when the baseline under `name` (which keeps the target's floors) beats
    the artifact on the target's `objective`: smaller by more than the search's `SIZE_TIE` (a
    BERT-base's smoothed int8 of the original, 0.25 % larger than onnxruntime's own, was as
    small to the search), or faster beyond timing noise; else None."""
    what = f"onnxruntime {quantize} of the original also keeps the target's floors and is"
    if objective == "size" and (1 + SIZE_TIE) * baseline["onnx_bytes"] < sizes["artifact"]:
        return (f"{what} smaller than the artifact by more than {SIZE_TIE:.0%} "
                f"({baseline['onnx_bytes']:,} against {sizes['artifact']:,} bytes)")
    if (objective == "latency" and key is not None and key in latency.get(name, {})
            and latency[name][key] < latency["compressed"][key]
            and not _within_timing_noise(latency, key, name, "compressed")):
        return (f"{what} faster than the artifact at {_batch(key)} "
                f"({latency[name][key]:.3g} against {latency['compressed'][key]:.3g} ms, "
                "beyond timing noise)")
    return None


def _within_timing_noise(latency: dict[str, Any], key: str, name: str = "compressed",
                         against: str = "original") -> bool:
    """Whether the runs of `name` (the artifact, or a baseline) and of `against` at `key`
    overlap in their middle halves."""
    first, second = (figures.Timing(latency[n][key], tuple(latency["quartiles"][n][key]))
                     for n in (name, against))
    return first.overlaps(second)


def _floors_met(fidelity: dict[str, dict], floors: dict[str, float] | None) -> str:
    """Return each output's figure that it is judged by (and its floor, when given)."""
    parts = []
    for name, figures_ in fidelity.items():
        judged = judged_figure(figures_)
        if judged is None:
            continue
        figure, value, lower_is_better = judged
        floor = "" if floors is None else f" {'≤' if lower_is_better else '≥'} {floors[figure]:g}"
        parts.append(f"{name} {FIGURE_LABELS[figure]} {value:.4f}{floor}")
    return ", ".join(parts)


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
