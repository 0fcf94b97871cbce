"""The rewriting stage: the student, a copy of the original whose planned layers compute
W = f(θ), θ initialized from the original's weights (and corrected sequentially)."""

from __future__ import annotations

import gc

import torch
from torch import fx

from compressor.load.stage import LoadedJob
from compressor.methods import GradReduction
from compressor.plan.planning import Plan
from compressor.plan.stage import PlannedJob
from compressor.rewrite.kept import CorrectedThetas, KeptInitialization
from compressor.rewrite.parametrize import compressed_theta, parametrize_
from compressor.rewrite.sequential import (
    checking_batches,
    correct_sequentially_,
    correction_batches,
    correction_bytes_per_sample,
)
from compressor.runtime.context import JobContext
from compressor.runtime.graph import shallow_copy
from compressor.vocabulary import REWRITING

# Calibration samples the sequential correction wants, at most (the costs may afford fewer).
SEQUENTIAL_SAMPLES = 128


def rewrite(loaded: LoadedJob, planned: PlannedJob, grad_reduction: GradReduction,
            job: JobContext, thetas: CorrectedThetas | None = None) -> fx.GraphModule:
    """Return a student sharing the original's unchanged tensors, with the plan's
    parametrizations, θ initialized. `planned.stats` is consumed (emptied)."""
    with job.log.stage(REWRITING):
        job.control.report(REWRITING, 0.0, f"initializing {len(planned.plan.compressed)} layers")
        return build_student(loaded, planned, grad_reduction, job, report_progress=True,
                             keep=True, thetas=thetas)


def build_student(loaded: LoadedJob, planned: PlannedJob, grad_reduction: GradReduction,
                  job: JobContext, report_progress: bool = False,
                  keep: bool = False, thetas: CorrectedThetas | None = None) -> fx.GraphModule:
    """Return the initialized student of `planned` (what `rewrite` does, inside whichever
    stage calls it: the target search scores candidates this way). `planned.stats` is
    consumed (emptied). With `keep`, in a job that keeps products for a retry, θ is kept once
    corrected, and taken from an earlier try instead of corrected again
    (`compressor.rewrite.kept`). With `thetas`, θ is taken from there when this job has
    corrected the same plan before, and kept there once corrected."""
    # A GraphModule sits in reference cycles: a student its caller dropped is freed only by the
    # cycle collector, which may not run for a long time (the tiny MLP's target search had 3
    # dropped students alive when it built the next; each of Gemma-3 270M's holds ~1 GB of θ).
    gc.collect()
    plan, teacher = planned.plan, loaded.teacher
    student = shallow_copy(teacher)

    def progress(done: int, total: int, name: str) -> None:
        if report_progress:
            job.control.report(REWRITING, 0.5 * done / total, f"layer {done}/{total}: {name}")

    parametrize_(student, plan, planned.stats, grad_reduction, progress)
    planned.stats.clear()  # what is left (statistics no layer read) is not needed again
    if not any(p.method.corrects_sequentially for p in plan.compressed):
        return student
    if report_progress:
        job.control.report(REWRITING, 0.5, "re-solving each layer on the compressed model")
    wanted = min(len(loaded.train), SEQUENTIAL_SAMPLES)
    samples = job.costs.sequential_samples(wanted, correction_bytes_per_sample(
        teacher, plan, loaded.train.take(torch.arange(1))))
    settings = f"{grad_reduction}, {samples} samples"
    kept = (KeptInitialization(job.resume, plan, settings, job.log.info)
            if keep and job.resume is not None else None)
    if kept is not None and kept.load_(compressed_theta(student, plan)):
        job.reused("θ as corrected")
        return student
    if thetas is not None and thetas.load_(plan, settings, compressed_theta(student, plan)):
        job.log.info("sequential correction: θ as this job corrected it for the same plan "
                     "before")
    else:
        _correct(student, loaded, plan, samples, wanted, job)
        if thetas is not None:
            thetas.save(plan, settings, compressed_theta(student, plan))
    if kept is not None:
        kept.save(compressed_theta(student, plan))
    return student


def _correct(student: fx.GraphModule, loaded: LoadedJob, plan: Plan, samples: int,
             wanted: int, job: JobContext) -> None:
    """Correct `student`'s θ sequentially, layer by layer, on `samples` of the training split."""
    batches = correction_batches(loaded.train, samples)
    checks = len(checking_batches(len(batches)))
    job.log.info(f"sequential correction on {samples} of {wanted} samples in "
                 f"{len(batches)} batches" + (f", {checks} of them checking each refit"
                                              if checks else ""))
    gains = correct_sequentially_(student, loaded.teacher, plan, batches)
    job.log.info(f"sequential correction: {sum(g < 1 for g in gains.values())} of "
                 f"{len(gains)} layers refitted"
                 + (", each fitting the checking batches better" if checks else ""))
