"""The finetuning stage: θ distilled from the original, and the trained student scored.

The original's outputs on the held-out split are computed once (`HeldOut`); the student is
scored on them before and after fine-tuning (fidelity per output, and the held-out
distillation loss fine-tuning keeps its best θ by), and each trained layer against the
original's (`report.figures.layer_errors`). A job that keeps products for a retry
(`JobContext.resume`) keeps fine-tuning checkpoints, and goes on from one it finds
(`compressor.finetune.checkpoints`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from compressor.config import FinetuneConfig
from compressor.finetune.checkpoints import FinetuneCheckpoints
from compressor.finetune.device import finetune_on_device_
from compressor.finetune.layer_errors import layer_errors
from compressor.finetune.loop import (
    Distillation,
    FinetuneSummary,
    FloorCheck,
    HeldOut,
    held_out_score,
)
from compressor.load.stage import LoadedJob
from compressor.plan.planning import Plan
from compressor.runtime.context import JobContext
from compressor.runtime.objectives import KL_TEMPERATURE
from compressor.runtime.outputs import FidelityMeter, OutputFidelity
from compressor.runtime.top_logits import TopKOutputs
from compressor.vocabulary import FINETUNING

# Held-out samples per evaluation batch (fidelity, fine-tuning's held-out score), at most:
# `SampleCosts.evaluation_batch` takes fewer when a model's outputs are large (a decoder's logits).
EVAL_BATCH = 64
# Held-out samples the per-layer errors are measured on, at most.
LAYER_ERROR_SAMPLES = 64


@dataclass
class TrainedJob:
    """The trained student and how it scores against the original.

    `student` is dropped (None) once the export has taken what it needs of it; `held_out`
    holds the original's held-out outputs until the artifact is scored on them.
    """

    student: fx.GraphModule | None
    held_out: HeldOut | None
    summary: FinetuneSummary
    initial: list[OutputFidelity]  # fidelity of the student as initialized
    final: list[OutputFidelity]  # ... and as trained
    layer_errors: dict[str, dict[str, float]]
    # the factors a quantization-aware run simulated the smoothed int8 with (by weight name),
    # which the export then smooths by: the int8 model shipped is the one θ learned through
    int8_input_scales: dict[str, torch.Tensor] | None = None


def finetune(loaded: LoadedJob, plan: Plan, student: fx.GraphModule, config: FinetuneConfig,
             job: JobContext, enough: FloorCheck | None = None,
             int8_input_scales: dict[str, torch.Tensor] | None = None) -> TrainedJob:
    """Fine-tune `student` in place and score it; with `enough`, only until it keeps a floor;
    with `int8_input_scales`, through int8 of the model smoothed by them (`Distillation`)."""
    with job.log.stage(FINETUNING):
        job.control.report(FINETUNING, 0.0)
        batch_size = job.costs.evaluation_batch(EVAL_BATCH)
        job.log.info(f"{job.costs.describe()}; held-out batches of {batch_size}")
        top_k = TopKOutputs(config.logits_top_k, tuple(loaded.next_token), KL_TEMPERATURE)
        held_out = HeldOut.of(loaded.teacher, loaded.held_out, batch_size, top_k, job.scratch)
        scoring_started = job.control.budget.elapsed_s()
        initial, initial_score = fidelity(student, held_out, loaded.kinds, loaded.next_token)
        lesson = Distillation(loaded.teacher, loaded.kinds, loaded.train, held_out, enough,
                              int8_input_scales,
                              scoring_s=job.control.budget.elapsed_s() - scoring_started,
                              language_model=any(loaded.next_token))
        checkpoints = None if job.resume is None else FinetuneCheckpoints.for_run(
            job.resume, plan, config, job.log.info)
        if checkpoints is not None:
            checkpoints.on_resume = job.reused
        summary = finetune_on_device_(student, plan, lesson, config, job.control, initial_score,
                                      checkpoints)
        for why in (summary.distill_note, summary.skipped, summary.cut_by_budget):
            if why is not None:
                job.log.info(why)
        if summary.floor_kept_at is not None:
            job.log.info(f"fine-tuning ended at step {summary.floor_kept_at} of {config.steps}: "
                         + ("the held-out fidelity keeps the floor" if summary.best_step else
                            "no step improved on θ as initialized, which keeps the floor"))
        rate = ("" if summary.relative_lr is None
                else f", peak learning rate {summary.relative_lr:g} × each tensor's RMS")
        how = f", {summary.samples_per_step} samples a step" + (
            "" if summary.tokens_per_step is None else f" ({summary.tokens_per_step} tokens)")
        how += ", blocks checkpointed" if summary.activation_checkpointing else ""
        if summary.blocks_distilled:
            how += (f", each of its {summary.blocks_distilled} blocks distilled on the "
                    "original's (block-wise)")
        elif summary.logits_top_k is not None:
            how += f", next-token logits distilled on the original's top {summary.logits_top_k}"
        if summary.teacher_outputs_cached:
            how += (f", the original run once on each of the {summary.teacher_samples} of "
                    f"{len(loaded.train)} training samples the steps drew")
        job.log.info(f"fine-tuning on {summary.device}{how}{rate}: held-out loss "
                     f"{summary.initial_score:.4f} -> {summary.best_score:.4f} "
                     f"(best step {summary.best_step})")
        # Best step 0: θ is the initialization's, restored exactly, and so are its outputs.
        final = initial if summary.best_step == 0 else fidelity(
            student, held_out, loaded.kinds, loaded.next_token)[0]
        samples = min(len(loaded.held_out), job.costs.layer_error_samples(LAYER_ERROR_SAMPLES))
        errors = layer_errors(loaded.teacher, student, plan,
                              loaded.held_out.take(torch.arange(samples)))
    return TrainedJob(student, held_out, summary, initial, final, errors, int8_input_scales)


def as_initialized(loaded: LoadedJob, student: fx.GraphModule, held_out: HeldOut,
                   job: JobContext, why: str,
                   scored: tuple[list[OutputFidelity], float] | None = None) -> TrainedJob:
    """Return `student` as a trained job that took no step (`why`: e.g. the time budget is
    spent), scored against `held_out` as its caller holds it (no pass of the original: no top
    k is made for training), or, given `scored` (its fidelity and held-out score, measured
    already on the same held-out split), not scored again. Its layers' errors are not
    measured: what fine-tuning would report on is not worth a pass of both models here."""
    with job.log.stage(FINETUNING):
        job.control.report(FINETUNING, 0.0, why)
        job.log.info(why)
        initial, score = scored if scored is not None else fidelity(
            student, held_out, loaded.kinds, loaded.next_token)
        summary = FinetuneSummary(0, "cpu", score, score, 0, skipped=why)
    return TrainedJob(student, held_out, summary, initial, initial, {})


def fidelity(student: fx.GraphModule | None, held_out: HeldOut, kinds: list[str],
             next_token: list[bool] | None = None) -> tuple[list[OutputFidelity], float]:
    """Return per-output fidelity of `student` against the original's held-out outputs (and,
    for the outputs `next_token` marks, against the held-out text: `FidelityMeter`), and its
    held-out score (`held_out_score`, which feeds the fidelity meter from the same pass).
    `student` None is the original itself (a student that compresses no layer): its outputs
    are the held-out ones, read, not computed again."""
    meter = FidelityMeter(kinds, next_token)
    score = held_out_score(student, held_out, kinds, meter)
    return meter.result(), score
