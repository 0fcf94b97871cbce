"""One compression job, top to bottom: load, plan, rewrite, fine-tune, export, verify, report."""

from __future__ import annotations

import gc
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.utils._pytree import tree_leaves

from compressor import huggingface
from compressor import report as figures
from compressor.allocation import allocate_by_sensitivity, measure_sensitivities
from compressor.budget import CALIBRATION_BATCH, Budget
from compressor.config import CompressionConfig
from compressor.data import Dataset, InputSpec, input_specs, load_data, synthesize_data
from compressor.errors import CompressorError, InternalError, ResourceError
from compressor.export import (
    export_onnx,
    move_onnx,
    onnx_bytes,
    onnx_output_names,
    onnx_outputs,
    quantize_int8,
    torch_outputs,
    verify_onnx,
    verify_quantized,
)
from compressor.failures import known_failure
from compressor.finetune import (
    FinetuneSummary,
    copy_back_,
    finetune_,
    held_out_score,
    on_device,
    resolve_device,
)
from compressor.fisher import estimate_sensitivities, probe_bytes_per_sample
from compressor.graph import collect_layer_stats, find_layers
from compressor.guards import check_guards
from compressor.huggingface import LoadedCheckpoint
from compressor.joblog import JobLog
from compressor.loading import load_program
from compressor.memory import (
    BASE_PEAK_BYTES,
    PEAK_PER_MODEL_BYTE,
    available_memory_bytes,
    format_bytes,
    loaded_weight_bytes,
    model_memory_estimate,
)
from compressor.methods import LayerStats
from compressor.methods.lowrank import LowRank
from compressor.objectives import detect_output_kinds
from compressor.outputs import FidelityMeter, OutputFidelity, call, run_outputs
from compressor.planning import Plan, plan_layers
from compressor.progress import JobControl, ProgressCallback, StopCheck
from compressor.rewrite import factorize, materialize, parametrize_, shallow_copy
from compressor.sequential import correct_sequentially_
from compressor.vocabulary import HF_ARTIFACT

_CALIBRATION_SAMPLES = 512
_SENSITIVITY_SAMPLES = 32
# Measuring each layer's sensitivity (a forward pass per layer) is done up to this many FLOPs;
# past it the sensitivities are predicted in one pass (about 2 minutes on 2 cores).
_PROBE_FLOPS = 10**13
# The one-pass prediction keeps every probed layer's input for the backward pass: it runs on as
# many samples as fit in this fraction of the model's bytes (at least one).
_ESTIMATE_BYTES_PER_MODEL_BYTE = 0.3
_SEQUENTIAL_SAMPLES = 128
_LATENCY_BATCHES = (1, 32)
# Held-out samples per evaluation batch (fidelity, fine-tuning's held-out score), at most:
# `Budget.evaluation_batch` takes fewer when a model's outputs are large (a decoder's logits).
_EVAL_BATCH = 64


@dataclass(frozen=True)
class Result:
    """What a finished job leaves in `out_dir`."""

    out_dir: Path
    model_path: Path  # out_dir / "model.onnx"
    report_path: Path  # out_dir / "report.json"
    log_path: Path  # out_dir / "job.log"
    report: dict[str, Any]


@dataclass
class _Inputs:
    program: ExportedProgram | None  # None once exported: its weights are freed
    specs: list[InputSpec]
    train: Dataset
    held_out: Dataset
    checkpoint: LoadedCheckpoint | None = None  # set when the model is a Hugging Face folder


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
    result is also written as model-hf.zip (see `compressor.huggingface`). `config` is a
    `CompressionConfig`, a dict or JSON (None: all defaults). `data` is an optional
    .safetensors / .npz file of inputs named after the program's inputs (for a checkpoint, also
    .txt / .jsonl text). `progress` receives a
    `ProgressEvent` per update; `should_stop` is polled at every step and a True answer raises
    `CancelledError`. Every failure raises a `CompressorError` subclass with a stable `code`
    (an unexpected one is an `InternalError` whose traceback job.log holds under its id);
    artifacts are written atomically, so `out_dir` never holds a half-written file, and
    model.onnx / report.json exist only when the job succeeded. job.log is written either way.
    """
    config = CompressionConfig.parse(config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    log = JobLog(out_dir / "job.log")
    control = JobControl(progress, should_stop, config.timeout_s)
    try:
        return _run(Path(model), config, out_dir, None if data is None else Path(data), control, log)
    except CompressorError as exc:
        log.info(f"failed ({exc.code}): {exc.message}")
        raise
    except Exception as exc:
        error = known_failure(exc)
        if error is None:
            error = InternalError.wrapping(exc, log.failed_stage)
            log.traceback(exc, error.error_id)
        log.info(f"failed ({error.code}): {error.message}")
        raise error from exc
    finally:
        log.close()


def _run(model: Path, config: CompressionConfig, out_dir: Path, data: Path | None,
         control: JobControl, log: JobLog) -> Result:
    torch.manual_seed(config.finetune.seed)
    log.info(f"config: {config.to_json()}")
    with log.stage("loading"):
        control.report("loading", 0.0, f"loading {model.name}")
        check_resources(model, out_dir)
        inputs = load_inputs(model, data, config, workdir=out_dir)
        log.info(f"inputs: {[(s.name, s.shape, str(s.dtype)) for s in inputs.specs]}; "
                 f"data: {inputs.train.source} ({len(inputs.train)} train, "
                 f"{len(inputs.held_out)} held-out)")
    # The original shares the program's tensors (nothing writes to them), the student shares
    # every tensor it does not change with the original: one copy of the weights in memory.
    teacher = shallow_copy(inputs.program.module()).eval()
    names, kinds = output_kinds(teacher, inputs, config)
    log.info(f"outputs: {dict(zip(names, kinds, strict=True))}")
    budget = Budget.measure(teacher, inputs.train.take(torch.arange(1)))
    evaluation_batch = budget.evaluation_batch(_EVAL_BATCH)
    log.info(f"{budget.describe()}; held-out batches of {evaluation_batch}")
    with log.stage("planning"):
        control.report("planning", 0.0)
        plan = plan_layers(*find_layers(teacher), config)
    with log.stage("calibrating"):
        stats = calibrate(teacher, plan, inputs.train, control, budget, log)
        if config.allocation == "sensitivity":
            control.report("planning", 0.9, "measuring each layer's sensitivity")
            plan = allocate(teacher, plan, stats, inputs.train, kinds, budget, log)
        log.info(f"plan ({plan.allocation}): {len(plan.compressed)} layers compressed, kept "
                 f"{plan.kept_numel / max(1, plan.targeted_numel):.3f} of targeted weights")
    with log.stage("rewriting"):
        control.report("rewriting", 0.0, f"initializing {len(plan.compressed)} layers")
        student = rewrite(teacher, plan, stats, inputs.train, config, control, budget, log)
        del stats  # consumed: the decompositions are only needed to initialize θ
    with log.stage("finetuning"):
        control.report("finetuning", 0.0)
        with torch.no_grad():  # the original's held-out outputs, computed once
            reference = [run_outputs(teacher, b)
                         for b in inputs.held_out.batches(evaluation_batch)]
        initial, initial_score = fidelity(student, reference, inputs.held_out, kinds,
                                          evaluation_batch)
        summary = finetune(student, teacher, plan, inputs, config, control, kinds,
                           (reference, evaluation_batch), initial_score)
        if summary.skipped is not None:
            log.info(summary.skipped)
        blocks = ", blocks checkpointed" if summary.activation_checkpointing else ""
        log.info(f"fine-tuning on {summary.device}{blocks}: held-out loss "
                 f"{summary.initial_score:.4f} "
                 f"-> {summary.best_score:.4f} (best step {summary.best_step})")
        # Best step 0: θ is the initialization's, restored exactly, and so are its outputs.
        final = initial if summary.best_step == 0 else fidelity(
            student, reference, inputs.held_out, kinds, evaluation_batch)[0]
        layer_errors = figures.layer_errors(teacher, student, plan, inputs.held_out.take(
            torch.arange(min(len(inputs.held_out), budget.layer_error_samples(64)))))
        sizes = size_figures(teacher, student, plan, inputs, config)
    staging_dir = out_dir / ".staging"
    shutil.rmtree(staging_dir, ignore_errors=True)
    staging_dir.mkdir()
    staging = staging_dir / "model.onnx"
    quantized = staging_dir / "int8" / "model.onnx"
    artifact_fidelity = None  # differs from `final` only when the artifact is quantized
    hf_staging = staging_dir / HF_ARTIFACT
    try:
        with log.stage("exporting"):
            sample = inputs.held_out.take(torch.arange(min(2, len(inputs.held_out))))
            baseline = None  # the original's ONNX, the latency baseline
            if config.export.latency_seconds > 0:
                control.report("exporting", 0.0, "exporting the original (latency baseline)")
                baseline = staging_dir / "original" / "model.onnx"
                baseline.parent.mkdir()
                export_onnx(teacher, sample, inputs.specs, baseline, config.export.opset)
            control.report("exporting", 0.5, f"exporting the {config.export.form} form")
            # The dense form takes each layer's θ as its W is made: the student is spent after.
            artifact_module = materialized(student, teacher, plan, config.export.form)
            # Nothing reads the original's weights any more: those the artifact does not share
            # are freed (the original's outputs stay, in `reference`).
            del student, teacher
            inputs.program = None
            gc.collect()
            export_onnx(artifact_module, sample, inputs.specs, staging, config.export.opset)
        with log.stage("verifying"):
            control.report("verifying", 0.0, "comparing onnxruntime with PyTorch")
            expected = torch_outputs(artifact_module, inputs.held_out,
                                     batch_size=evaluation_batch)
            hf_folder = None
            if inputs.checkpoint is not None and config.export.form == "dense":
                control.report("verifying", 0.1, "writing the Hugging Face folder")
                hf_folder = staging_dir / "huggingface"
                huggingface.write_checkpoint(inputs.checkpoint, artifact_module, hf_folder)
                inputs.checkpoint = None  # the original transformers model is done with
            # onnxruntime, then the reloaded Hugging Face folder, get the memory these held
            del artifact_module
            gc.collect()
            parity: dict[str, Any] = verify_onnx(staging, expected, config.export.atol,
                                                 config.export.rtol)
            if hf_folder is not None:
                control.report("verifying", 0.3, "checking the Hugging Face folder")
                parity["huggingface"] = huggingface.check_checkpoint(
                    hf_folder, staging, inputs.held_out, hf_staging, config.export.atol,
                    config.export.rtol)
            log.info(f"onnxruntime parity: {parity['max_abs_diff']}")
            if config.export.quantize == "int8":
                control.report("verifying", 0.5, "quantizing to int8")
                quantized.parent.mkdir()
                quantize_int8(staging, quantized)
                parity["quantized"] = verify_quantized(quantized, expected,
                                                       config.export.quantized_tolerance)
                log.info(f"int8 against the compressed model: {parity['quantized']['relative_l2']}")
                move_onnx(quantized, staging)
                artifact_fidelity = onnx_fidelity(staging, reference, inputs.held_out, kinds,
                                                  evaluation_batch)
            del expected, reference  # onnxruntime's latency sessions get their memory
            gc.collect()
            measured = {**sizes, **latency_figures(baseline, inputs, staging, config, budget)}
        if hf_staging.exists():
            os.replace(hf_staging, out_dir / HF_ARTIFACT)
        move_onnx(staging, out_dir / "model.onnx")
    finally:
        shutil.rmtree(staging_dir, ignore_errors=True)
    control.report("verifying", 1.0, "done")
    log.info("succeeded")
    log.close()
    report = {
        "status": "succeeded",
        "config": config.to_dict(),
        "inputs": [{"name": s.name, "shape": list(s.shape), "dtype": str(s.dtype)}
                   for s in inputs.specs],
        "data": {"source": inputs.train.source, "synthetic": inputs.train.synthetic,
                 "train_samples": len(inputs.train), "held_out_samples": len(inputs.held_out),
                 **({"note": "no data file was given: inputs were sampled to match the "
                             "program's example inputs, so fidelity is measured on "
                             "synthetic inputs"} if inputs.train.synthetic else {})},
        "plan": _plan_with_errors(plan, layer_errors),
        **measured,
        "fidelity": {"initialization": figures.fidelity_dict(initial, names),
                     "final": figures.fidelity_dict(final, names),
                     **({"artifact": figures.fidelity_dict(artifact_fidelity, names)}
                        if artifact_fidelity is not None else {})},
        "finetune": asdict(summary),
        "onnx_parity": parity,
        "stage_seconds": log.stage_seconds,
        "memory": _memory_figures(log, budget.model_bytes),
        "versions": figures.versions(),
        "artifacts": {name: {"size": (out_dir / name).stat().st_size,
                             "sha256": figures.sha256_of(out_dir / name)}
                      for name in ("model.onnx", "model.onnx.data", HF_ARTIFACT, "job.log")
                      if (out_dir / name).is_file()},
    }
    figures.write_json_atomic(out_dir / "report.json", report)
    return Result(out_dir, out_dir / "model.onnx", out_dir / "report.json",
                  out_dir / "job.log", report)


def _memory_figures(log: JobLog, model_bytes: int) -> dict[str, Any]:
    peaks = log.stage_peak_rss_bytes
    return {"stage_peak_rss_bytes": peaks, "model_bytes": model_bytes,
            "peak_per_model_byte": max(peaks.values()) / max(1, model_bytes)}


def check_resources(model: Path, out_dir: Path) -> None:
    """Refuse a job up front when the machine cannot hold the model or its artifacts.

    The estimate is from the upload's weights as they will be loaded (float32): the peak memory
    a job reaches (`memory.model_memory_estimate`) against what the machine has available, and
    the artifacts (about the weights again) against the free space of `out_dir`.
    """
    weights = loaded_weight_bytes(model)
    needed = model_memory_estimate(weights)
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise ResourceError(
            f"this model needs about {format_bytes(needed)} of memory to compress "
            f"({format_bytes(BASE_PEAK_BYTES)} + {PEAK_PER_MODEL_BYTE:g}× its "
            f"{format_bytes(weights)} of float32 weights) and this machine has "
            f"{format_bytes(available)} available; run the job on a machine (or worker) with "
            "more memory, or free memory and retry")
    free = shutil.disk_usage(out_dir).free
    if 2 * weights > free:
        raise ResourceError(
            f"the job's artifacts need about {format_bytes(2 * weights)} of disk and "
            f"{out_dir} has {format_bytes(free)} free; free some space (or delete old jobs) "
            "and retry")


def load_inputs(model: Path, data: Path | None, config: CompressionConfig,
                workdir: Path) -> _Inputs:
    """Load the program safely and the job's data (or sample it), split train / held-out.

    A Hugging Face folder or archive (unpacked inside `workdir`) becomes a program first.
    """
    if huggingface.is_checkpoint(model):
        loaded = huggingface.load_checkpoint(model, workdir, config.data.max_length)
        dataset = huggingface.checkpoint_data(loaded, data, config.data, config.finetune.seed)
        train, held_out = dataset.split(config.data.holdout_fraction, config.finetune.seed)
        return _Inputs(loaded.program, loaded.specs, train, held_out, loaded)
    program = load_program(model)
    specs = input_specs(program)
    if data is None:
        dataset = synthesize_data(specs, config.data.synthetic_samples, config.finetune.seed)
    else:
        dataset = load_data(data, specs, config.data.max_samples)
    train, held_out = dataset.split(config.data.holdout_fraction, config.finetune.seed)
    largest = min(max(64, config.finetune.batch_size), len(dataset))
    check_guards(program, dataset, (1, largest))
    return _Inputs(program, specs, train, held_out)


def calibrate(teacher: fx.GraphModule, plan: Plan, train: Dataset,
              control: JobControl | None = None, budget: Budget | None = None,
              log: JobLog | None = None) -> dict[str, LayerStats]:
    """Return the statistics the planned layers' initialization uses, by layer name.

    For the layers whose method needs them: the inputs each layer sees on calibration samples
    (a Gram matrix, an embedding's row reads). Lowrank layers also get their decomposition
    (`stats[name].extras["lowrank"]`), which both the allocation and the initialization read;
    it is kept only up to the largest rank either can use, and its Gram matrix is dropped as
    soon as it is decomposed. When every calibration sample fits in memory at once, each layer
    is decomposed as the calibration pass reaches it, so one Gram matrix is alive at a time.
    """
    stats: dict[str, LayerStats] = {}
    lowrank = {p.layer.name: p for p in plan.compressed if isinstance(p.method, LowRank)}
    decomposed = 0

    def complete(name: str, entry_stats: LayerStats) -> None:
        nonlocal decomposed
        stats[name] = entry_stats
        entry = lowrank.get(name)
        if entry is None:
            return
        decomposed += 1
        if control is not None:
            control.report("planning", 0.1 + 0.8 * decomposed / len(lowrank),
                           f"decomposing layer {decomposed}/{len(lowrank)}: {name}")
        weight = teacher.get_submodule(name).weight.detach()
        factors = entry.method.factorize(
            entry.layer, weight, entry_stats if entry.method.needs_input_stats else None)
        keep = max(LowRank.break_even_rank(entry.layer), entry.size or 0)
        # Its own statistics, without the Gram matrix (others reading it may still use it).
        stats[name] = LayerStats(None, entry_stats.rows, entry_stats.row_counts,
                                 {**entry_stats.extras, "lowrank": factors.truncated(keep)})

    needing = [p.layer for p in plan.compressed if p.method.needs_input_stats]
    if needing:
        if control is not None:
            control.report("planning", 0.0, f"calibrating {len(needing)} layers")
        wanted = min(len(train), _CALIBRATION_SAMPLES)
        samples = wanted if budget is None else budget.calibration_samples(wanted)
        batch_size = (CALIBRATION_BATCH if budget is None
                      else budget.calibration_batch(samples))
        if log is not None:
            log.info(f"calibrating on {samples} of {wanted} samples, {batch_size} at a time"
                     + (" (each layer decomposed as it is reached)"
                        if batch_size >= samples else ""))
        calibration = train.take(torch.arange(samples))
        batches = list(Dataset(calibration, train.synthetic, train.source).batches(batch_size))
        collect_layer_stats(teacher, needing, batches, complete)
    for name in lowrank:
        if name not in stats:  # no statistics (svd init, or a layer too wide for a Gram)
            complete(name, LayerStats(None))
    return stats


def allocate(teacher: fx.GraphModule, plan: Plan, stats: dict[str, LayerStats], train: Dataset,
             kinds: list[str], budget: Budget, log: JobLog | None = None) -> Plan:
    """Return `plan` with its lowrank ranks spread by sensitivity.

    Each layer's sensitivity is measured (one forward pass per layer) while that costs at most
    `_PROBE_FLOPS`; past it (a large model) it is predicted from one forward and backward pass
    on as many samples as `_ESTIMATE_BYTES_PER_MODEL_BYTE` of memory allows (`compressor.fisher`).
    """
    factors = {name: s.extras["lowrank"] for name, s in stats.items() if "lowrank" in s.extras}
    if not factors:
        return plan
    one = train.take(torch.arange(1))
    samples = min(len(train), _SENSITIVITY_SAMPLES)
    probe_flops = len(factors) * samples * budget.flops_per_sample
    if probe_flops <= _PROBE_FLOPS:
        batch = train.take(torch.arange(samples))
        sensitivities = measure_sensitivities(teacher, plan, factors, batch, kinds)
        how = f"measured: {len(factors)} probes of {samples} samples"
    else:
        memory = _ESTIMATE_BYTES_PER_MODEL_BYTE * budget.model_bytes
        samples = max(1, min(samples, int(memory // probe_bytes_per_sample(teacher, plan, one))))
        batch = train.take(torch.arange(samples))
        sensitivities = estimate_sensitivities(teacher, plan, factors, batch, kinds)
        how = (f"predicted from one backward pass on {samples} samples (probing each layer "
               f"would cost {probe_flops / 1e12:.0f} TFLOP)")
    if log is not None:
        log.info(f"sensitivities {how}")
    break_even = {p.layer.name: LowRank.break_even_rank(p.layer) for p in plan.layers}
    return allocate_by_sensitivity(plan, factors, sensitivities, break_even)


def rewrite(teacher: fx.GraphModule, plan: Plan, stats: dict[str, LayerStats], train: Dataset,
            config: CompressionConfig, control: JobControl | None = None,
            budget: Budget | None = None, log: JobLog | None = None) -> fx.GraphModule:
    """Return a student sharing `teacher`'s unchanged tensors, with the plan's
    parametrizations, θ initialized. Each layer's entry of `stats` is consumed (removed)."""
    student = shallow_copy(teacher)

    def progress(done: int, total: int, name: str) -> None:
        if control is not None:
            control.report("rewriting", 0.5 * done / total, f"layer {done}/{total}: {name}")

    parametrize_(student, plan, stats, config.finetune.grad_reduction, progress)
    if any(p.method.corrects_sequentially for p in plan.compressed):
        if control is not None:
            control.report("rewriting", 0.5, "re-solving each layer on the compressed model")
        wanted = min(len(train), _SEQUENTIAL_SAMPLES)
        samples = wanted if budget is None else budget.sequential_samples(wanted)
        if log is not None:
            log.info(f"sequential correction on {samples} of {wanted} samples")
        correct_sequentially_(student, teacher, plan, train.take(torch.arange(samples)))
    return student


def output_kinds(teacher: fx.GraphModule, inputs: _Inputs, config: CompressionConfig,
                 ) -> tuple[list[str], list[str]]:
    """Return each output's ONNX name and kind (logits, embedding, regression, ignored): the
    kind decides its loss and how it is scored. One run of the original on two samples."""
    sample = inputs.held_out.take(torch.arange(min(2, len(inputs.held_out))))
    with torch.no_grad():
        raw = call(teacher, sample)
    outputs = [leaf for leaf in tree_leaves(raw) if isinstance(leaf, torch.Tensor)]
    names = onnx_output_names(raw)
    return names, detect_output_kinds(teacher, raw, outputs, config.finetune.loss, names)


def finetune(student: fx.GraphModule, teacher: fx.GraphModule, plan: Plan, inputs: _Inputs,
             config: CompressionConfig, control: JobControl, kinds: list[str],
             reference: tuple[list[list[torch.Tensor]], int],
             initial_score: float) -> FinetuneSummary:
    """Fine-tune `student` in place, on CUDA when there is one (θ is copied there and back).

    `reference` holds the original's outputs on the held-out batches, and their batch size;
    `initial_score` the student's held-out score before fine-tuning."""
    device = resolve_device(config.finetune.device)
    if device.type == "cpu":
        return finetune_(student, teacher, plan, inputs.train, inputs.held_out, config.finetune,
                         control, device, kinds, reference, initial_score)
    teacher_on_device, student_on_device = on_device(teacher, student, device)
    outputs, batch_size = reference
    on_device_outputs = [[t.to(device) for t in batch] for batch in outputs]
    summary = finetune_(student_on_device, teacher_on_device, plan, inputs.train,
                        inputs.held_out, config.finetune, control, device, kinds,
                        (on_device_outputs, batch_size), initial_score)
    copy_back_(student, teacher, student_on_device)
    return summary


def fidelity(student: fx.GraphModule, reference: list[list[torch.Tensor]], held_out: Dataset,
             kinds: list[str], batch_size: int) -> tuple[list[OutputFidelity], float]:
    """Return per-output fidelity of `student` against the original's outputs `reference`
    (one list per batch of `batch_size` of the held-out split), and its held-out score
    (`finetune.held_out_score`, which feeds the fidelity meter from the same pass)."""
    meter = FidelityMeter(kinds)
    score = held_out_score(student, reference, list(held_out.batches(batch_size)), kinds, meter)
    return meter.result(), score


def onnx_fidelity(path: Path, reference: list[list[torch.Tensor]], held_out: Dataset,
                  kinds: list[str], batch_size: int):
    """Return per-output fidelity of the ONNX model at `path` against the original's outputs."""
    meter = FidelityMeter(kinds)
    for actual, expected in zip(onnx_outputs(path, held_out, batch_size), reference,
                                strict=True):
        meter.add([torch.from_numpy(a) for a in actual], expected)
    return meter.result()


def materialized(student: fx.GraphModule, teacher: fx.GraphModule, plan: Plan,
                 form: str) -> fx.GraphModule:
    """Return the module to export: plain dense weights, or the compact form. Both share the
    student's tensors; the dense form takes each layer's θ as it makes its W (the student
    cannot run afterwards)."""
    if form == "factorized":
        return factorize(student, teacher, plan).eval()
    return materialize(student, teacher, plan, consume=True).eval()


def size_figures(teacher: fx.GraphModule, student: fx.GraphModule, plan: Plan, inputs: _Inputs,
                 config: CompressionConfig) -> dict[str, Any]:
    """Return parameter counts and FLOPs, before and after (the dense form has the original's
    shapes; the compact form shares θ with the student)."""
    one = inputs.held_out.take(torch.arange(1))
    factorized = factorize(student, teacher, plan)
    before_flops = figures.count_flops(teacher, one)
    factorized_flops = figures.count_flops(factorized, one)
    dense = config.export.form == "dense"
    return {
        "parameters": {"before": figures.count_parameters(teacher),
                       "after": figures.count_parameters(teacher if dense else factorized),
                       "factorized_form": figures.count_parameters(factorized),
                       "targeted_weights_before": plan.targeted_numel,
                       "targeted_weights_after": round(plan.kept_numel)},
        "flops": {"before": before_flops,
                  "after": before_flops if dense else factorized_flops,
                  "factorized_form": factorized_flops,
                  "per": "one sample"},
    }


def latency_figures(original_path: Path | None, inputs: _Inputs, artifact_path: Path,
                    config: CompressionConfig, budget: Budget) -> dict[str, Any]:
    """Return the ONNX file sizes and onnxruntime latency, before (the original's export at
    `original_path`, None when latency is not measured) and after. Batch sizes whose one run
    would pass `compressor.budget.LATENCY_FLOPS` are left out, and listed as such."""
    seconds = config.export.latency_seconds
    latency: dict[str, Any] = {"original": {}, "compressed": {}, "seconds_per_figure": seconds,
                               "runtime": "onnxruntime CPUExecutionProvider, median"}
    sizes: dict[str, int | None] = {"original": None, "artifact": onnx_bytes(artifact_path)}
    if original_path is None or seconds <= 0:
        return {"onnx_bytes": sizes, "latency": latency}
    sizes["original"] = onnx_bytes(original_path)
    kept, left_out = budget.latency_batches(_LATENCY_BATCHES)
    if left_out:
        per_sample = budget.activation_bytes_per_sample + budget.output_bytes_per_sample
        latency["left_out"] = {
            f"batch_{b}_ms": f"one run would cost {b * budget.flops_per_sample / 1e12:.2g} TFLOP "
                             f"and {format_bytes(b * per_sample)} of activations"
            for b in left_out}
    for batch_size in kept:
        batch = inputs.held_out.take(torch.arange(batch_size) % len(inputs.held_out))
        key = f"batch_{batch_size}_ms"
        latency["original"][key] = figures.onnx_latency_ms(original_path, batch, seconds)
        latency["compressed"][key] = figures.onnx_latency_ms(artifact_path, batch, seconds)
    return {"onnx_bytes": sizes, "latency": latency}


def _plan_with_errors(plan: Plan, errors: dict[str, dict[str, float]]) -> dict[str, Any]:
    planned = plan.to_dict()
    for entry in planned["layers"]:
        entry.update(errors.get(entry["name"], {}))
    return planned
