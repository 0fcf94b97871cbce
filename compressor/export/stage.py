"""The exporting and verifying stages: the trained student as ONNX, checked against PyTorch.

Exporting measures what each form costs (parameters, FLOPs), exports the original (the latency
baseline) and the student in the configured form (`rewrite.forms`: dense weights materialized,
or the compact form), writes the Hugging Face folder for a checkpoint's dense result and stacks
int8 quantization when asked. Verifying runs onnxruntime against PyTorch on the held-out inputs
(and the Hugging Face folder, reloaded, against onnxruntime), and scores a quantized artifact,
or a language model's (whose perplexity is a figure of its own), against the original, and the
baselines a user would pick instead (onnxruntime int8 and int4 of the original).
Everything is written in a staging folder; the reporting stage moves the artifacts in place.
"""

from __future__ import annotations

import contextlib
import gc
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx

from compressor.config import ExportConfig, TargetConfig
from compressor.errors import ExportError, ResourceError, VerificationError
from compressor.export import huggingface
from compressor.export.onnx import export_onnx, move_onnx, onnx_bytes
from compressor.export.quantize import quantize_int4, quantize_int8, verify_quantized
from compressor.export.smoothing import (
    WORTH_SMOOTHING,
    divided_inputs,
    input_scales,
    smoothed_for_int8,
)
from compressor.export.verify import (
    NOISE_FLOPS,
    TorchOutputs,
    onnx_session,
    run_onnx,
    torch_outputs,
    verify_onnx,
)
from compressor.finetune.loop import HeldOut
from compressor.finetune.stage import TrainedJob
from compressor.load.stage import LoadedJob
from compressor.plan.planning import Plan
from compressor.rewrite.forms import factorize, materialize, own_copies_
from compressor.runtime.context import JobContext
from compressor.runtime.costs import count_flops, count_parameters
from compressor.runtime.memory import format_bytes
from compressor.runtime.outputs import (
    FidelityMeter,
    OutputFidelity,
    describe_fidelity,
    fidelity_by_output,
)
from compressor.vocabulary import EXPORTING, HF_ARTIFACT, ONNX_ARTIFACT, VERIFYING

# export.quantize's quantizers, by name: each writes a model's quantized form (`source`,
# `target`, `onnxruntime_defaults=`), and each is a baseline of the report, in this order.
QUANTIZERS = {"int8": quantize_int8, "int4": quantize_int4}

# Training samples int8 smoothing measures each MatMul input's channels on, at most, and how
# many at a time.
SMOOTHING_SAMPLES = 64
SMOOTHING_BATCH = 16


@dataclass
class ExportedJob:
    """What the exporting stage wrote in the staging folder, and what verifying compares."""

    model: Path  # the exported model (float; replaced by its quantized form once verified)
    original: Path | None  # the original's export, the latency baseline (None: not measured)
    quantized: Path | None  # the int8 or int4 form, when asked for
    huggingface: Path | None  # the Hugging Face folder written, for a checkpoint's dense result
    huggingface_zip: Path  # where the checked folder is zipped
    torch_reference: TorchOutputs | None  # PyTorch's outputs of the exported module
    sizes: dict[str, Any]  # parameters and FLOPs, before and after


@contextlib.contextmanager
def staging_folder(out_dir: Path, name: str = ".staging") -> Iterator[Path]:
    """Yield a new, empty staging folder in `out_dir`, removed with what is left in it."""
    staging = out_dir / name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_(loaded: LoadedJob, plan: Plan, trained: TrainedJob, config: ExportConfig,
            staging: Path, job: JobContext, scored_file: Path | None = None) -> ExportedJob:
    """Export the original and the trained student into `staging`. `scored_file`: the
    student's quantized form (`config.quantize`) as target mode's search made and scored it,
    its θ unchanged since: moved in as the quantized form rather than made again.

    Consumes the models: the student's θ goes into the dense weights as they are made, and
    the original, the student and a checkpoint's transformers model are dropped
    from `loaded` and `trained` once exported, so that their weights are freed (the original's
    held-out outputs stay, in `trained.held_out`).
    """
    with job.log.stage(EXPORTING):
        teacher, student = loaded.teacher, trained.student
        sizes = size_figures(teacher, student, plan, loaded, config)
        sample = loaded.held_out.take(torch.arange(min(2, len(loaded.held_out))))
        original = None
        if config.latency_seconds > 0:
            _step(job, EXPORTING, 0.0, "exporting the original (latency baseline)")
            original = staging / "original" / ONNX_ARTIFACT
            original.parent.mkdir()
            export_onnx(teacher, sample, loaded.specs, original, config.opset)
        _step(job, EXPORTING, 0.5, f"exporting the {config.form} form")
        # The dense form takes each layer's θ as its W is made: the student is spent after.
        artifact_module = materialized(student, teacher, plan, config.form)
        # the compact form's few tensors shared with the original, copied below
        originals = ({t.untyped_storage().data_ptr()
                      for t in teacher.state_dict(keep_vars=True).values()}
                     if config.form == "factorized" else None)
        del teacher, student
        loaded.teacher = trained.student = None
        hf_folder = None
        if loaded.checkpoint is not None and config.form == "dense":
            _step(job, EXPORTING, 0.6, "writing the Hugging Face folder")
            hf_folder = staging / "huggingface"
            huggingface.write_checkpoint(loaded.checkpoint.checkpoint, artifact_module, hf_folder)
        # Nothing reads the original's weights any more (a checkpoint's transformers model holds
        # them too, whatever the form): those the artifact does not share are freed.
        loaded.checkpoint = None
        if originals is not None:  # so that the original's file goes too
            copied = own_copies_(artifact_module, originals)
            job.log.info(f"export: the artifact's {format_bytes(copied)} of tensors shared with "
                         "the original copied, so that the original is freed whole")
        del originals
        gc.collect()
        model = staging / ONNX_ARTIFACT
        export_onnx(artifact_module, sample, loaded.specs, model, config.opset)
        _step(job, EXPORTING, 0.7, "the artifact's outputs on the held-out split, in PyTorch")
        reference = torch_outputs(artifact_module, loaded.held_out,
                                  batch_size=trained.held_out.batch_size,
                                  noise_flops=NOISE_FLOPS if config.noise_multiple else 0,
                                  spill=staging / "torch_outputs")
        source = model  # what int8 quantizes: the artifact, or its smoothed copy
        if (config.quantize == "int8" and config.int8_smoothing is not None
                and scored_file is None):
            _step(job, EXPORTING, 0.8, "smoothing the activations for int8")
            source = staging / "smoothed" / ONNX_ARTIFACT
            source.parent.mkdir()
            simulated = trained.int8_input_scales
            smoothed = smoothed_for_int8(artifact_module, smoothing_batches(loaded),
                                         config.int8_smoothing, simulated)
            job.log.info(f"int8 smoothing: {divided_inputs(smoothed)} MatMul inputs divided, "
                         + ("by the factors quantization-aware fine-tuning simulated"
                            if simulated is not None else
                            f"those whose int8 error smoothing cuts to {WORTH_SMOOTHING:g} of "
                            "itself or less"))
            export_onnx(smoothed, sample, loaded.specs, source, config.opset)
            del smoothed
        # onnxruntime, then the reloaded Hugging Face folder, get the memory these held
        del artifact_module
        gc.collect()
        quantized = None
        if config.quantize is not None:
            quantized = staging / config.quantize / ONNX_ARTIFACT
            quantized.parent.mkdir()
            if scored_file is not None:
                _step(job, EXPORTING, 0.9, f"the {config.quantize} model as the search scored "
                                           "it (θ unchanged since)")
                move_onnx(scored_file, quantized)
            else:
                _step(job, EXPORTING, 0.9, f"quantizing to {config.quantize}")
                QUANTIZERS[config.quantize](source, quantized,
                                            largest_weight_bytes=job.costs.largest_weight_bytes)
    return ExportedJob(model, original, quantized, hf_folder, staging / HF_ARTIFACT, reference,
                       sizes)


def _step(job: JobContext, stage: str, fraction: float, message: str) -> None:
    """Report `message` as `stage`'s progress, and log it: the log's timestamps then say what
    each step took (a BERT-base's export, verification and report took 213 s where 117 were
    kept for them)."""
    job.control.report(stage, fraction, message)
    job.log.info(f"{stage}: {message}")


@dataclass
class VerifiedJob:
    """What verifying measured: onnxruntime against PyTorch, and against the original."""

    parity: dict[str, Any]
    # The artifact's fidelity against the original, measured with onnxruntime when it is
    # quantized or is a language model (its perplexity is a figure of its own); None: the
    # artifact is the verified float student, whose fidelity the finetuning stage measured.
    artifact_fidelity: list[OutputFidelity] | None
    # What a user would pick instead, by quantization ("int8", "int4"): onnxruntime's
    # quantization of the original, scored on the same held-out inputs (none when the
    # original was not exported).
    baselines: dict[str, Baseline]


@dataclass
class Baseline:
    """onnxruntime's quantization of the original (int8 dynamic, or int4 weight-only), with
    its defaults, in the staging folder."""

    quantize: str  # "int8" or "int4"
    model: Path | None  # None: the quantizer refused the original (`error` says why)
    bytes: int | None
    fidelity: list[OutputFidelity] | None
    error: str | None = None


def verify(exported: ExportedJob, trained: TrainedJob, loaded: LoadedJob, config: ExportConfig,
           job: JobContext, target: TargetConfig | None = None) -> VerifiedJob:
    """Return the onnxruntime parity figures, a quantized artifact's fidelity against the
    original, and the baselines'.

    Raises `VerificationError` when onnxruntime and PyTorch disagree past the tolerance. In
    target mode a quantized artifact is judged by its floors on the held-out split, not by
    `quantized_tolerance` (the search chose it on its fidelity to the original, measured on
    the same split): missing one raises too. Leaves
    the artifact to hand back at `exported.model` (the quantized form, when quantized), and drops
    the outputs it compared (`exported.torch_reference`, `trained.held_out`).
    """
    with job.log.stage(VERIFYING):
        _step(job, VERIFYING, 0.0, "comparing onnxruntime with PyTorch")
        parity: dict[str, Any] = verify_onnx(exported.model, exported.torch_reference,
                                             config.atol, config.rtol, config.noise_multiple)
        if exported.huggingface is not None:
            _step(job, VERIFYING, 0.3, "checking the Hugging Face folder")
            parity["huggingface"] = huggingface.check_checkpoint(
                exported.huggingface, exported.model, loaded.held_out, exported.huggingface_zip,
                config.atol, config.rtol,
                config.noise_multiple * max(parity["noise_floor"].values(), default=0.0))
        job.log.info(f"onnxruntime parity: {parity['max_abs_diff']}")
        artifact_fidelity = None
        if exported.quantized is not None:
            _step(job, VERIFYING, 0.5, f"checking the {config.quantize} model")
            parity["quantized"] = verify_quantized(
                exported.quantized, exported.torch_reference,
                None if target is not None else config.quantized_tolerance, config.quantize)
            job.log.info(f"{config.quantize} against the compressed model: "
                         f"{parity['quantized']['relative_l2']}")
            move_onnx(exported.quantized, exported.model)
        if exported.quantized is not None or any(loaded.next_token):
            _step(job, VERIFYING, 0.6, "scoring the artifact on the held-out split")
            artifact_fidelity = onnx_fidelity(exported.model, trained.held_out, loaded.kinds,
                                              loaded.next_token)
            if target is not None:
                _check_floors(artifact_fidelity, loaded.output_names, target)
        baselines = {}
        if exported.original is not None:
            for index, quantize in enumerate(QUANTIZERS):
                _step(job, VERIFYING, 0.8 + 0.1 * index,
                      f"scoring onnxruntime {quantize} of the original")
                baselines[quantize] = quantized_baseline(exported.original, quantize,
                                                         trained.held_out, loaded.kinds,
                                                         loaded.next_token,
                                                         job.costs.largest_weight_bytes)
        exported.torch_reference = trained.held_out = None  # onnxruntime's latency sessions
        gc.collect()  # get their memory
    return VerifiedJob(parity, artifact_fidelity, baselines)


def _check_floors(fidelity: list[OutputFidelity], names: list[str], target: TargetConfig) -> None:
    figures = fidelity_by_output(fidelity, names)
    if not target.met_by(figures):
        raise VerificationError(
            f"the artifact misses the target on the held-out split ({describe_fidelity(figures)};"
            f" floors: {target.floors()}) although the search measured it meeting them: report "
            "this with job.log; set `ratio` to compress to a size you choose meanwhile")


def quantized_baseline(original: Path, quantize: str, held_out: HeldOut, kinds: list[str],
                       next_token: list[bool] | None = None,
                       largest_weight_bytes: int | None = None) -> Baseline:
    """Quantize the original's export with onnxruntime's defaults (`quantize`: "int8" dynamic,
    "int4" weight-only: what a user would do instead of compressing) and score it against the
    original on the held-out split; a baseline the quantizer fails on, or lacks the memory
    for, is reported with why."""
    model = original.parent / quantize / ONNX_ARTIFACT
    model.parent.mkdir()
    try:
        QUANTIZERS[quantize](original, model, onnxruntime_defaults=True,
                             largest_weight_bytes=largest_weight_bytes)
    except (ExportError, ResourceError) as exc:
        return Baseline(quantize, None, None, None, exc.message)
    return Baseline(quantize, model, onnx_bytes(model),
                    onnx_fidelity(model, held_out, kinds, next_token))


def smoothing_batches(loaded: LoadedJob) -> list[dict[str, torch.Tensor]]:
    """Return the training samples int8 smoothing measures activations on: at most
    `SMOOTHING_SAMPLES`, `SMOOTHING_BATCH` at a time."""
    count = min(SMOOTHING_SAMPLES, len(loaded.train))
    return [loaded.train.take(torch.arange(start, min(start + SMOOTHING_BATCH, count)))
            for start in range(0, count, SMOOTHING_BATCH)]


def int8_input_scales(loaded: LoadedJob, student: fx.GraphModule, plan: Plan,
                      config: ExportConfig) -> dict[str, torch.Tensor] | None:
    """Return the factors `config.int8_smoothing` will divide the compact form's MatMul inputs
    by (by weight name, `smoothing.input_scales`), measured on `student` as it is now: what a
    quantization-aware fine-tuning simulates int8 with. None when nothing is smoothed."""
    if config.int8_smoothing is None:
        return None
    return input_scales(materialized(student, loaded.teacher, plan, "factorized"),
                        smoothing_batches(loaded), config.int8_smoothing)


def materialized(student: fx.GraphModule, teacher: fx.GraphModule, plan: Plan,
                 form: str) -> fx.GraphModule:
    """Return the module to export: plain dense weights, or the compact form. Both share the
    student's tensors; the dense form takes each layer's θ as it makes its W (the student
    cannot run afterwards)."""
    if form == "factorized":
        return factorize(student, teacher, plan).eval()
    return materialize(student, teacher, plan, consume=True).eval()


def onnx_fidelity(path: Path, held_out: HeldOut, kinds: list[str],
                  next_token: list[bool] | None = None) -> list[OutputFidelity]:
    """Return per-output fidelity of the ONNX model at `path` against the original's outputs
    (and, for the outputs `next_token` marks, against the held-out text: `FidelityMeter`)."""
    meter = FidelityMeter(kinds, next_token)
    session = onnx_session(path, prepack=False)
    # One batch's outputs at a time: a decoder's logits over the whole split are never held.
    for batch, expected in zip(held_out.batches(), held_out.reference, strict=True):
        meter.add([torch.from_numpy(a) for a in run_onnx(session, batch)], expected, batch)
    return meter.result()


def size_figures(teacher: fx.GraphModule, student: fx.GraphModule, plan: Plan,
                 loaded: LoadedJob, config: ExportConfig) -> dict[str, Any]:
    """Return parameter counts and FLOPs, before and after (the dense form has the original's
    shapes; the compact form shares θ with the student)."""
    one = loaded.held_out.take(torch.arange(1))
    factorized = factorize(student, teacher, plan)
    before_flops = count_flops(teacher, one)
    factorized_flops = count_flops(factorized, one)
    dense = config.form == "dense"
    return {
        "parameters": {"before": count_parameters(teacher),
                       "after": count_parameters(teacher if dense else factorized),
                       "factorized_form": count_parameters(factorized),
                       "targeted_weights_before": plan.targeted_numel,
                       "targeted_weights_after": round(plan.kept_numel)},
        "flops": {"before": before_flops,
                  "after": before_flops if dense else factorized_flops,
                  "factorized_form": factorized_flops,
                  "per": "one sample"},
    }
