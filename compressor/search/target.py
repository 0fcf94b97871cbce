"""Target mode: the smallest (or fastest) model that keeps a stated fidelity, found by one search.

A job with a `target` states what it must keep (a floor per output kind) instead of a ratio.
The search calibrates and decomposes once, then walks the candidates that calibration makes
cheap to build: each budget (kept fraction of the targeted weights, spread by sensitivity along
the allocation's greedy path), in float or with onnxruntime's quantization stacked on its
compact form (int8 dynamic, int4 weight-only), and int8 and int4 of the original itself (kept
fraction 1: when one keeps the floor and nothing smaller does, it is what a user should take).
Budgets are scored largest first, down to the first beyond fine-tuning's reach of the floor
(a smaller one only loses more; int8 and int4 of it more still). Each candidate is initialized
(θ from the decompositions, corrected sequentially) and scored on the held-out split against
the original: in PyTorch for the float form, on the real
quantized ONNX model for the others. Fine-tuning then goes to the finalists, smallest first:
candidates that miss the floor by little as initialized (within fine-tuning's reach, `REACH`)
and are smaller than the smallest that meets it, then those that meet it. An int8 finalist
trains through int8 arithmetic, simulated (`compressor.finetune.quantization_aware`), when it
is quantized unsmoothed; an int4 one trains in float (nothing simulates MatMulNBits' 4-bit
blocks). A finalist's fine-tuning ends at the first held-out evaluation that keeps the floor
(in float, by the margin its quantization took as initialized): `finetune.steps` is the most it
takes. Each is checked again after fine-tuning (a quantized one on its real quantized
model), and the first that meets the floor is the one handed on to export. When none does,
the job fails with `target_not_met`, giving the best fidelity reached and at what size.
Candidates that meet the floor within `SIZE_TIE` of the smallest one's bytes are as small as
it: each candidate that meets the floor is timed as it is scored, and of those the fastest is
tried first, timed again in turn with the smallest (`_Scout.in_turn`).

With objective `latency` the order is by onnxruntime latency at the target's batch size
instead of bytes: every candidate that meets the floor or is within reach of it is exported
(quantized ones already are) and timed, and the fastest is fine-tuned first. Its budgets are
then shares of what the targeted layers cost to run (`_latency_costs`: multiply-adds, each
layer's numbers weighed by its input rows), and embedding tables stay dense. int8 of the
original is also scored unsmoothed: the smoothing's Mul nodes cost time, and where the floor
holds without them, that int8 is the faster. Before the finalists are tried, those faster than
the fastest that meets the floor, and those that meet it within `LATENCY_TIE` of its latency,
are timed again in turn with it: one candidate timed after another for half a second each
moved by more than what separates them (all-MiniLM-L6-v2: the same job shipped a kept 0.95 +
int8 timed 3 % faster than int8 of the original in its search, and 4.5 % slower than
onnxruntime int8 in its report, the two timed in turn).

With a time budget (`max_minutes`), scoring stops once less than half the work time the search
started with is left (the rest is the finalists'), and once the budget is spent no finalist is
tried but the cheapest that met the floor as initialized, untrained; what was cut is recorded
for the report, and a `target_not_met` says the budget cut the search.

The search drives the stages (`plan`, `rewrite`, `finetune`); it does not live inside them.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import fx

from compressor.config import CompressionConfig, ExportConfig, TargetConfig
from compressor.errors import ConfigError, ExportError, TargetNotMetError
from compressor.export.onnx import export_onnx, onnx_bytes, onnx_files
from compressor.export.smoothing import smoothed_for_int8
from compressor.export.stage import QUANTIZERS, materialized, onnx_fidelity, smoothing_batches
from compressor.finetune.loop import FloorCheck, HeldOut
from compressor.finetune.stage import (
    EVAL_BATCH,
    TrainedJob,
    as_initialized,
    fidelity,
    finetune,
)
from compressor.load.stage import LoadedJob
from compressor.methods import configured
from compressor.methods.share_values import ShareValuesOptions
from compressor.plan.allocation import allocate_by_sensitivity, sensitivities_of
from compressor.plan.planning import LayerPlan, Plan
from compressor.plan.stage import PlannedJob
from compressor.report.figures import onnx_latencies_ms
from compressor.rewrite.kept import CorrectedThetas
from compressor.rewrite.stage import build_student, rewrite
from compressor.runtime.budget import TimeBudget, finishing_reserve_after_s
from compressor.runtime.context import JobContext
from compressor.runtime.costs import count_parameters
from compressor.runtime.layers import LayerStats
from compressor.runtime.outputs import (
    PERPLEXITY_RATIO,
    OutputFidelity,
    describe_fidelity,
    fidelity_by_output,
    judged_figure,
)
from compressor.search.kept import KeptSearch
from compressor.search.layer_forms import LayerForms, layer_rows
from compressor.vocabulary import ONNX_ARTIFACT, PLANNING

# The kept fractions of the targeted weights the search tries (`_Scout._walk_floats`: largest
# first), finer near the top, where a high floor is kept (all-MiniLM-L6-v2 at cosine 0.99: kept
# 0.8 + int8 misses after fine-tuning at 0.988, 0.9 + int8 meets at 0.9926).
KEPT_FRACTIONS = (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95)
# The shared-values candidate's codebook size: every targeted weight one of 256 values, its index
# one byte (`share_values`). A quarter of the float bytes with the arithmetic left float: where
# int8's per-tensor activations cost the fidelity, it keeps it (untrained, all-MiniLM-L6-v2:
# cosine 0.9994 at 22.8 MB against onnxruntime int8's 0.9925 at 22.9 MB; EfficientNet-Lite0,
# whose convolutions int8 leaves float here: top-1 0.98 at 5.6 MB against the 14.8 MB the
# int8 candidates reach).
SHARED_VALUES = 256
# Quantized candidates tried at most, each kind (each is exported and run in onnxruntime).
INT8_TRIES = 4
INT4_TRIES = 3
# Candidates that miss the floor by at most this as initialized (top-1 agreement, cosine; a
# relative L2 this share above its floor) are within fine-tuning's reach: smaller ones are
# fine-tuned first, before the smallest that meets the floor as initialized.
REACH = 0.01
REACH_RELATIVE_L2 = 0.5
# ... and a language model's perplexity ratio this much above its floor (100 CPU steps of 256
# tokens took Gemma-3 270M at ratio 0.8 from 1.51 to 1.43 × the original's).
REACH_PERPLEXITY_RATIO = 0.1
# Candidates within reach tried at most before the smallest that meets the floor.
REACH_TRIES = 2
# Objective size: candidates that meet the floor with at most this share more bytes than the
# smallest that does are as small as it; the fastest of them (onnxruntime latency at the
# target's batch size) is tried first. Gemma-3 270M: 256 shared values a layer, 268.8 MB, ran
# 3.2x slower than the original at 1 x 128 tokens; int8 of the original, 269.6 MB (0.3 % more),
# as fast as it.
SIZE_TIE = 0.02
# With a time budget, scoring candidates stops when less than this share of the work time the
# search started with is left: the rest is for its finalists (rewriting, fine-tuning).
FINALISTS_SHARE = 0.5
# onnxruntime time spent on each candidate's latency (objective latency).
CANDIDATE_LATENCY_SECONDS = 0.5
# ... and on each file when finalists are timed again in turn (`_Scout.in_turn`).
IN_TURN_LATENCY_SECONDS = 1.0
# Objective latency: candidates that meet the floor at most this share slower than the fastest
# that does are timed again in turn with it before the finalists are ordered.
LATENCY_TIE = 0.1
# How a finalist was fine-tuned, by what it runs in (the report's `tries`).
_FINE_TUNED_IN = {
    "float": "in float",
    "int8": "through int8 arithmetic, simulated (quantization-aware)",
    "int4": "in float: nothing simulates int4 (MatMulNBits' 4-bit blocks); scored on the real "
            "int4 model after",
}
_NOT_FINE_TUNED_LATE = "not: the search spent the time budget (shipped as initialized)"
_NOTHING_TO_TRAIN = "not: it compresses no layer, so it has no θ to train"


@dataclass
class Candidate:
    """One point of the search: a budget, a form, and what it measured."""

    kept_fraction: float  # of the targeted weights (the allocation's budget)
    quantize: str | None  # None, "int8" or "int4"
    parameters: int  # of the compact form
    bytes: int  # of its ONNX file: as exported, or 4 bytes a parameter (`bytes_estimated`)
    fidelity: dict[str, dict[str, Any]]  # per output, of the initialized candidate
    meets_floor: bool
    bytes_estimated: bool = False
    # onnxruntime latency (ms) at the target's latency batch: objective latency only, and
    # only for candidates that meet the floor or are within reach of it
    latency_ms: float | None = None
    # int8 without the smoothing `export.int8_smoothing` asks for: objective latency scores the
    # original's int8 both ways, the smoothing's Mul nodes costing time
    unsmoothed: bool = False
    method: str = "lowrank"  # or "share_values": the shared-values candidate
    # its held-out score (`held_out_score`) where it was scored in PyTorch (float), else None
    held_out_score: float | None = None
    plan: Plan | None = field(default=None, repr=False)
    # its ONNX file as it ships, kept from when it was timed as it was scored (`_Scout.keep`)
    # for timing it again in turn with the others it is weighed against; None: not kept
    shipped_file: Path | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        """Return how the log names the candidate: its kept fraction and quantization."""
        if self.method == "share_values":
            return f"shared values ({SHARED_VALUES} a layer)"
        return (f"kept {self.kept_fraction:g}{f' {self.quantize}' if self.quantize else ''}"
                f"{' unsmoothed' if self.unsmoothed else ''}")

    def cost(self, objective: str) -> float:
        """What the objective minimizes: bytes, or milliseconds (unmeasured: inf)."""
        if objective == "latency":
            return self.latency_ms if self.latency_ms is not None else float("inf")
        return float(self.bytes)

    def summary(self) -> dict[str, Any]:
        """Return the candidate as plain data for the report."""
        data = asdict(self)
        data.pop("plan")
        data.pop("shipped_file")
        if self.plan is not None and self.plan.dense_exports:
            data["dense_exports"] = sorted(self.plan.dense_exports)
        return data


@dataclass
class SearchResult:
    """What target mode chose, and every candidate it weighed."""

    planned: PlannedJob
    trained: TrainedJob
    export: ExportConfig  # the export form and quantization of the chosen candidate
    chosen: Candidate
    candidates: list[Candidate]
    tries: list[dict[str, Any]]  # each fine-tuned finalist and its fidelity after
    target: TargetConfig

    def summary(self) -> dict[str, Any]:
        """Return the search as plain data for the report."""
        return {"objective": self.target.objective, "floors": self.target.floors(),
                "export": {"form": self.export.form, "quantize": self.export.quantize},
                "chosen": self.chosen.summary(),
                "candidates": [c.summary() for c in self.candidates], "tries": self.tries}


def search(loaded: LoadedJob, calibrated: PlannedJob, config: CompressionConfig,
           workdir: Path, job: JobContext) -> SearchResult:
    """Find, fine-tune and return the smallest candidate that meets `config.target`, from the
    layers `calibrated` found and prepared (planned at `ratio`, which sensitivities are
    measured at). Scratch files go in `workdir`."""
    target, plan, stats = config.target, calibrated.plan, calibrated.stats
    with job.log.stage(PLANNING):
        job.control.report(PLANNING, 0.0, "measuring each layer's sensitivity")
        prepared, sensitivities = sensitivities_of(loaded.teacher, plan, stats, loaded.train,
                                                   loaded.kinds, job)
        if not prepared:
            raise ConfigError(
                "target mode chooses each layer's size from a decomposition that prices every "
                f"size, which method {plan.layers[0].method.name!r} does not make"
                if plan.layers else "no layer of this model is targeted")
        # Only scored against: a language model's held-out logits (Gemma-3 270M's: 3.6 GB)
        # wait on disk rather than in memory through the search and the finalists' training.
        held_out = HeldOut.of(loaded.teacher, loaded.held_out,
                              job.costs.evaluation_batch(EVAL_BATCH), spill=job.scratch,
                              for_training=False)
        thetas = None if job.scratch is None else CorrectedThetas(
            job.scratch / "search-thetas",
            0 if job.resume is None else job.resume.reserve_bytes, job.log.info)
        scout = _Scout(loaded, stats, held_out, config, target, workdir, job, thetas)
        dense, costs = _dense(plan), None
        if target.objective == "latency":
            plan, costs = _latency_costs(plan, stats, job)
        plans = _budget_plans(plan, prepared, sensitivities, costs)
        shared = shared_values_plan(dense)
        kept = KeptSearch(job, plans, dense, shared, held_out.batch_size)  # what a retry reuses
        candidates = kept.candidates(Candidate)
        if candidates is None:
            candidates = scout.walk(plans, dense, shared)
            if not scout.cut:  # a search the budget cut is not what a retry should reuse
                kept.save_candidates(candidates)
    budget = job.control.budget
    if not candidates:
        raise TargetNotMetError(
            ("no candidate was scored" if scout.cut else "no candidate smaller than the "
             "original could be planned for this model; set `ratio` to compress it to a size "
             "you choose") + _cut_note(budget))
    near, meeting = _finalists(candidates, target)
    if not near and not meeting:
        scout.drop_kept_files()
        raise TargetNotMetError(_not_met(candidates, target, fine_tuned=False)
                                + _cut_note(budget))
    tries: list[dict[str, Any]] = []
    late = False  # a finalist was tried with the budget spent: no other will be
    untried = list(meeting)  # those that ship untrained should the budget run out
    for candidate in _in_order(near, meeting, scout):
        untried = [c for c in untried if c is not candidate]
        if (missed := kept.missed_before(candidate)) is not None:
            tries.append(missed)
            job.log.info(f"target: candidate {candidate.name} missed the floor after "
                         "fine-tuning in an earlier try: not fine-tuned again")
            continue
        untrainable = not candidate.plan.compressed  # the original, quantized: no θ
        fallback_s = 0.0 if late or untrainable else scout.fallback_s(candidate, untried,
                                                                        candidates)
        # Fine-tuning starts with a held-out pass in PyTorch, and keeps the time to ship an
        # untried finalist untrained: one the budget left cannot give that is not started (a
        # BERT-base's job spent 56 s on a finalist's setup for no step, and ended 87 s past
        # its budget). Then only one that met the floor as initialized ships, untrained.
        if not untrainable and not budget.affords(scout.scoring_s + fallback_s):
            if late or not candidate.meets_floor:
                budget.cut(f"target search: finalist {candidate.name} not tried")
                continue
            late = True
            budget.cut(f"fine-tuning skipped: the search spent the budget, and candidate "
                       f"{candidate.name} ships as initialized")
        planned = PlannedJob(candidate.plan, dict(stats))
        student = rewrite(loaded, planned, config.finetune.grad_reduction, job, thetas)
        # An unsmoothed int8 candidate learns through the int8 arithmetic it will run in;
        # every other one in float (int4 too: nothing simulates MatMulNBits' 4-bit blocks, so
        # an int4 finalist is judged on its real int4 model after). A smoothed int8 one could
        # learn through its smoothed int8 (`int8_input_scales`), but on all-MiniLM-L6-v2 that
        # reached no more than float did (kept 0.8: cosine 0.9878 against 0.9883 after 300
        # steps; kept 0.9: 0.9923 against 0.9926) at 1.4× the time a step.
        through_int8 = not late and candidate.quantize == "int8" and (
            candidate.unsmoothed or config.export.int8_smoothing is None)
        shipped = None
        if late or untrainable:
            # No step is taken: nothing is set up for training (the original's top k on the
            # held-out split, the training split's targets, the int8 simulation), and θ is the
            # one scored as a candidate, on the search's held-out outputs (Gemma-3 270M: 158 s
            # of passes over its held-out windows for a finalist shipped as initialized).
            trained = as_initialized(
                loaded, student, held_out, job,
                f"fine-tuning skipped: candidate {candidate.name} compresses no layer, so it "
                "has nothing to train" if untrainable else
                f"fine-tuning skipped: the search spent the time budget; candidate "
                f"{candidate.name} ships as initialized",
                _scored_as_initialized(candidate, candidates, loaded))
        else:
            if candidate.quantize is not None:
                shipped = _ShippedScore(scout, student, candidate, job)
            if fallback_s:
                job.log.info(f"target: {fallback_s:.0f} s kept while {candidate.name} is "
                             f"fine-tuned, to ship {untried[0].name} untrained should it miss "
                             "the floor with the budget spent")
            with budget.keeping(fallback_s):
                trained = finetune(loaded, candidate.plan, student,
                                   config.finetune.model_copy(
                                       update={"quantization_aware": through_int8}), job,
                                   enough=_floor_check(candidate, candidates, target, loaded,
                                                       through_int8, shipped))
        del student
        if candidate.quantize is not None and (late or trained.summary.best_step == 0):
            # θ as scored among the candidates (not trained, or no step did better and the
            # initialization's was restored exactly): its real quantized model's figures then
            reached = candidate.fidelity
        elif candidate.quantize is None:
            reached = fidelity_by_output(trained.final, loaded.output_names)
            if candidate.bytes_estimated:  # its real size, now that it may ship
                candidate.bytes = scout.exported_bytes(trained.student, candidate.plan)
                candidate.bytes_estimated = False
        elif trained.summary.floor_kept_at is not None and shipped.last is not None:
            reached = shipped.last  # what fine-tuning ended on: θ is the one scored then
        else:
            reached = scout.quantized_fidelity(trained.student, candidate.plan,
                                               candidate.quantize,
                                               smoothed=not candidate.unsmoothed)[0]
        ok = target.met_by(reached)
        tries.append({"kept_fraction": candidate.kept_fraction, "quantize": candidate.quantize,
                      "unsmoothed": candidate.unsmoothed, "method": candidate.method,
                      "fine_tuned": _NOTHING_TO_TRAIN if untrainable else _NOT_FINE_TUNED_LATE
                      if late else _FINE_TUNED_IN[
                          "int8" if through_int8 else "int4" if candidate.quantize == "int4"
                          else "float"],
                      "steps_run": trained.summary.steps_run,
                      "floor_kept_at": trained.summary.floor_kept_at,
                      "bytes": candidate.bytes, "fidelity": reached, "meets_floor": ok})
        job.log.info(f"target: candidate {candidate.name} after fine-tuning: "
                     f"{'meets' if ok else 'misses'} the floor ({describe_fidelity(reached)})")
        if ok:
            export = config.export.model_copy(update={
                "form": "factorized", "quantize": candidate.quantize,
                **({"int8_smoothing": None} if candidate.unsmoothed else {})})
            return SearchResult(planned, trained, export, candidate, candidates, tries, target)
        kept.keep_miss(tries[-1])
        # the missed finalist's student and fine-tuning split go before the next is built
        # (they stayed alive through its rewriting and fine-tuning)
        del trained, shipped
    raise TargetNotMetError(_not_met(candidates, target, fine_tuned=True, tries=tries)
                            + _cut_note(budget))


def _scored_as_initialized(candidate: Candidate, candidates: list[Candidate],
                           loaded: LoadedJob) -> tuple[list[OutputFidelity], float] | None:
    """Return the fidelity and held-out score of `candidate`'s student as initialized, as the
    search scored it in PyTorch: its own (float), or its float twin's (the same budget's plan,
    unquantized: the same student); None when neither was scored so."""
    twins = [c for c in candidates  # `candidate` among them
             if c.quantize is None and c.method == candidate.method
             and c.kept_fraction == candidate.kept_fraction and c.held_out_score is not None]
    if not twins:
        return None
    figures = twins[0].fidelity
    return ([OutputFidelity(**figures[name]) for name in loaded.output_names],
            twins[0].held_out_score)


class _ShippedScore:
    """Score `candidate`'s real quantized model as `student`'s θ is when called (fine-tuning
    trains that θ in place), logging each miss and keeping the last figures (`last`: those
    fine-tuning ended on, when it ended at the floor)."""

    def __init__(self, scout: _Scout, student: fx.GraphModule, candidate: Candidate,
                 job: JobContext) -> None:
        self.scout, self.student, self.candidate, self.job = scout, student, candidate, job
        self.last: dict[str, dict[str, Any]] | None = None

    def __call__(self) -> dict[str, dict[str, Any]]:
        candidate = self.candidate
        self.last = self.scout.quantized_fidelity(self.student, candidate.plan,
                                                  candidate.quantize,
                                                  smoothed=not candidate.unsmoothed)[0]
        if not self.scout.target.met_by(self.last):
            self.job.log.info(f"target: {candidate.name} keeps the floor in training, not as its "
                              f"real {candidate.quantize} model yet "
                              f"({describe_fidelity(self.last)}): fine-tuning goes on")
        return self.last


def _floor_check(candidate: Candidate, candidates: list[Candidate], target: TargetConfig,
                 loaded: LoadedJob, simulated: bool,
                 shipped: Callable[[], dict[str, dict[str, Any]]] | None = None,
                 ) -> FloorCheck | None:
    """Return when `candidate`'s fine-tuning has done enough: its held-out fidelity keeps the
    floor, by the margin its quantization took from the same budget as initialized when it
    trains in float and ships quantized (`simulated`: it trains through the int8 it ships in,
    no margin), and then, for a quantized one, what `shipped` scores (its real quantized model
    as θ is now) keeps it too: the margin is an estimate (the tiny digits CNN's int4 finalist
    kept the floor in float at step 25 by its margin, and its int4 model did not). None (every
    step) when that margin was not measured."""
    needed = dict.fromkeys(candidate.fidelity, 0.0)
    if candidate.quantize is not None and not simulated:
        floats = [c for c in candidates if c.quantize is None and c.method == candidate.method
                  and c.kept_fraction == candidate.kept_fraction]
        if not floats:
            return None
        needed = {name: max(0.0, target.margin(floats[0].fidelity[name]) - target.margin(figures))
                  for name, figures in candidate.fidelity.items()}

    def kept(fidelity: list[OutputFidelity]) -> bool:
        by_output = fidelity_by_output(fidelity, loaded.output_names)
        return all(target.margin(figures) >= needed[name] for name, figures in by_output.items())

    return FloorCheck(loaded.next_token, kept,
                      None if shipped is None else lambda: target.met_by(shipped()))


def _cut_note(budget: TimeBudget) -> str:
    """Return what the time budget cut, for a `target_not_met` message ('' when nothing)."""
    if not budget.cuts:
        return ""
    return (f". The time budget cut the search ({budget.describe()}: "
            f"{'; '.join(budget.cuts)}): raise max_minutes to let it go further")


def _finalists(candidates: list[Candidate], target: TargetConfig,
               ) -> tuple[list[Candidate], list[Candidate]]:
    """Return the candidates to fine-tune: those within fine-tuning's reach that cost less (by
    the objective: smaller, or faster) than the cheapest meeting the floor (cheapest first, at
    most `REACH_TRIES`), and those meeting it, cheapest first (`_in_order` tries them)."""
    def cost(candidate: Candidate) -> float:
        return candidate.cost(target.objective)

    meeting = sorted((c for c in candidates if c.meets_floor), key=cost)
    cheapest = cost(meeting[0]) if meeting else float("inf")
    # the original quantized (kept fraction 1) has no θ: fine-tuning cannot bring it nearer
    near = sorted((c for c in candidates if not c.meets_floor and cost(c) < cheapest
                   and c.kept_fraction < 1.0 and within_reach(c.fidelity, target)), key=cost)
    return near[:REACH_TRIES], meeting


def _in_order(near: list[Candidate], meeting: list[Candidate], scout: _Scout,
              ) -> Iterator[Candidate]:
    """Yield the finalists in the order they are tried: `near`, then `meeting`; objective
    size: those as small as the smallest (`SIZE_TIE`) fastest first; objective latency: by
    their latency timed again in turn (`_Scout.fastest_in_turn`), the `near` ones only when
    faster than the fastest that meets the floor. A candidate not timed as it was scored is
    timed only when the finalists come to it."""
    if scout.target.objective == "latency":
        near, meeting = scout.fastest_in_turn(near, meeting)
    else:
        meeting = scout.fastest_first(meeting)
    scout.drop_kept_files()
    yield from near
    yield from meeting


def within_reach(fidelity: dict[str, dict[str, Any]], target: TargetConfig) -> bool:
    """Whether every scored output is at most its figure's reach beyond its floor."""
    for figures in fidelity.values():
        judged = judged_figure(figures)
        reach = {"relative_l2": REACH_RELATIVE_L2 * target.relative_l2,
                 PERPLEXITY_RATIO: REACH_PERPLEXITY_RATIO}.get(judged[0] if judged else "", REACH)
        if target.margin(figures) < -reach:
            return False
    return True


def _not_met(candidates: list[Candidate], target: TargetConfig, fine_tuned: bool,
             tries: list[dict[str, Any]] | None = None) -> str:
    best = max(candidates, key=lambda c: min(target.margin(f) for f in c.fidelity.values()))
    floors = ", ".join(f"{k} {v:g}" for k, v in target.floors().items())
    after = ""
    if fine_tuned and tries:
        after = ("; after fine-tuning the smallest candidates that met it reached "
                 + "; ".join(f"{describe_fidelity(t['fidelity'])} at {t['bytes']:,} bytes"
                             for t in tries))
    return (f"no candidate meets the target ({floors}): the best reached "
            f"{describe_fidelity(best.fidelity)} keeping {best.kept_fraction:g} of the targeted weights"
            f"{f' with {best.quantize}' if best.quantize else ''} ({best.bytes:,} bytes)"
            f"{after}. Lower the "
            "floors in `target`, give more data or more `finetune.steps`, or set `ratio` to "
            "choose the size yourself")


def _budget_plans(plan: Plan, prepared: dict, sensitivities: dict[str, float],
                  costs: dict[str, float] | None = None) -> list[tuple[float, Plan]]:
    """Return the plan of every kept fraction the search tries, along the greedy path: of the
    targeted weights, or with `costs` (by layer, what a number of its θ costs to run), of what
    the targeted layers cost."""
    chosen = [p for p in plan.layers if p.adjustable and p.layer.name in prepared]
    total = sum((1.0 if costs is None else costs[p.layer.name]) * p.layer.numel for p in chosen)
    others = sum(p.compact_numel for p in plan.layers if p not in chosen)
    plans: list[tuple[float, Plan]] = []
    for fraction in KEPT_FRACTIONS:
        budgeted = allocate_by_sensitivity(plan, prepared, sensitivities,
                                           budget=fraction * total, costs=costs)
        if budgeted.allocation != "sensitivity" or not budgeted.compressed:
            continue
        if plans and _sizes(plans[-1][1]) == _sizes(budgeted):
            continue  # the same sizes as the smaller budget's (a small model's coarse ranks)
        numbers = others + fraction * total if costs is None else budgeted.kept_numel
        plans.append((fraction, replace(budgeted, budget=numbers)))
    return plans


def _sizes(plan: Plan) -> tuple:
    """Return each layer's size in `plan` (what makes two budgets' plans the same)."""
    return tuple(p.size for p in plan.layers)


def _latency_costs(plan: Plan, stats: dict[str, LayerStats], job: JobContext,
                   ) -> tuple[Plan, dict[str, float] | None]:
    """Return `plan` and what a number of each layer's θ costs to run, for the latency
    objective: its multiply-adds on the calibration samples, which is its input rows there (a
    Linear's tokens, a convolution's output positions), one multiply-add each.

    An embedding table stays dense: a lookup does no multiply-adds and its factorized form
    would add rank × width of them a token. Without every layer's rows (a method that reads
    no statistics), numbers are priced alike, as for the size objective.
    """
    tables = {p.layer.name for p in plan.layers
              if p.adjustable and p.layer.kind == "embedding" and not p.layer.tied_embedding}
    layers = tuple(replace(p, size=None, compact_numel=float(p.layer.numel), adjustable=False,
                           reason="kept dense: a table lookup does no multiply-adds, its "
                                  "factorized form would add some (objective latency)")
                   if p.layer.name in tables else p for p in plan.layers)
    plan = replace(plan, layers=layers)
    rows = {p.layer.name: stats[p.layer.name].rows if p.layer.name in stats else 0
            for p in plan.layers if p.adjustable}
    costs = None if not rows or min(rows.values()) <= 0 else {
        name: float(count) for name, count in rows.items()}
    job.log.info(f"target (objective latency): {len(tables)} embedding tables kept dense; "
                 + ("budgets are shares of the targeted layers' multiply-adds" if costs else
                    "budgets are shares of the targeted weights (not every layer's inputs "
                    "were counted)"))
    return plan, costs


def shared_values_plan(plan: Plan) -> Plan:
    """Return `plan` with every targeted layer `share_values` can shrink made of
    `SHARED_VALUES` shared values (the others left dense)."""
    method = configured(ShareValuesOptions(values=SHARED_VALUES))

    def shared(p: LayerPlan) -> LayerPlan:
        numel = method.compact_numel(p.layer, SHARED_VALUES)
        if p.layer.kind not in method.layer_kinds or numel >= p.layer.numel:
            return replace(p, size=None, compact_numel=float(p.layer.numel), adjustable=False,
                           reason=f"kept dense: {SHARED_VALUES} shared values save nothing")
        return replace(p, method=method, size=SHARED_VALUES, compact_numel=numel,
                       adjustable=False, reason="")

    layers = tuple(shared(p) for p in plan.layers)
    return replace(plan, layers=layers, budget=sum(p.compact_numel for p in layers),
                   layer_ratio=1.0)


def _all_dense(plan: Plan) -> bool:
    """Whether every layer `plan` compresses is exported dense (`Plan.dense_exports`)."""
    return bool(plan.compressed) and all(p.layer.name in plan.dense_exports
                                         for p in plan.compressed)


def _dense(plan: Plan) -> Plan:
    """Return `plan` with every layer left dense (the original's weights as they are)."""
    layers = tuple(replace(p, size=None, compact_numel=float(p.layer.numel),
                           reason="kept dense: the original, quantized") for p in plan.layers)
    return replace(plan, layers=layers, budget=float(plan.targeted_numel), layer_ratio=1.0)


class _Scout:
    """Initialize and score candidates, cheaply: one student at a time, no fine-tuning."""

    def __init__(self, loaded: LoadedJob, stats: dict, held_out: HeldOut,
                 config: CompressionConfig, target: TargetConfig, workdir: Path,
                 job: JobContext, thetas: CorrectedThetas | None = None) -> None:
        self.loaded, self.stats, self.held_out = loaded, stats, held_out
        self.config, self.target, self.workdir, self.job = config, target, workdir, job
        self.thetas = thetas  # each budget's θ as corrected, for its next student
        self.other_parameters = count_parameters(loaded.teacher)
        budget = job.control.budget
        self.work_s = max(0.0, budget.left_s() - budget.reserve_s)  # inf: no budget
        self.cut = False  # whether the time budget stopped the scoring
        # what each plan's student took to build (by `id` of the plan), and the longest a
        # student took to score in PyTorch: what a finalist shipped untrained costs
        # (`fallback_s`)
        self.built_s: dict[int, float] = {}
        self.scoring_s = 0.0
        self.forms: LayerForms | None = None  # objective latency: each layer's form, measured
        self.kept_files: Path | None = None  # the folder of files kept as timed (`keep`)

    def _affords(self, candidates: list[Candidate], what: str) -> bool:
        """Whether the time budget leaves room to score `what` (`FINALISTS_SHARE` of the work
        time the search started with is kept for its finalists); the first time it does not,
        the cut is recorded."""
        budget = self.job.control.budget
        if not self.cut and budget.affords(FINALISTS_SHARE * self.work_s):
            return True
        if not self.cut:
            self.cut = True
            budget.cut(f"target search stopped after {len(candidates)} candidates, before "
                       f"{what}")
            self.job.log.info(f"target: the time budget stops the search before {what} "
                              f"({budget.describe()})")
        return False

    def walk(self, plans: list[tuple[float, Plan]], dense: Plan, shared: Plan,
             ) -> list[Candidate]:
        """Score int8 of the original first; then the budgets in float, largest first, down to
        the first beyond fine-tuning's reach of the floor (`_walk_floats`); then int8 from the
        smallest float candidate within reach upward (int8 only loses fidelity), until one
        meets it or the tries run out; then int4 the same way (`_walk_int4`); then int4 of the
        original; then `shared`, the shared-values candidate.

        int8 of the original is the bar every compressed candidate has to clear, and the
        honest answer when the time budget runs out first: scored last, a BERT-base's
        20-minute job spent its search on float budgets and shipped one 1.7× smaller than the
        original, where int8 alone is 4× smaller."""
        candidates: list[Candidate] = []
        self._original_quantized(candidates, plans, dense, "int8")
        self._walk_floats(candidates, plans)
        passing = [c for c in candidates if c.meets_floor and c.quantize is None]
        if passing:  # the float finalist's real size, to weigh against the quantized ones
            smallest = min(passing, key=lambda c: c.kept_fraction)
            smallest.bytes, smallest.latency_ms, smallest.shipped_file = self._measured(
                self._student(smallest.plan), smallest.plan, self._timed(smallest.fidelity))
            smallest.bytes_estimated = False
            overhead = smallest.bytes - 4 * smallest.parameters  # the graph, names, ...
            for other in candidates:
                if other.bytes_estimated:
                    other.bytes = 4 * other.parameters + overhead
        # int8 only loses fidelity: from the smallest budget whose float candidate is within
        # reach of the floor upward, and none where no float candidate is
        reach = [c.kept_fraction for c in candidates
                 if c.quantize is None and within_reach(c.fidelity, self.target)]
        in_reach = [(f, p) for f, p in plans if reach and f >= min(reach)]
        for fraction, plan in in_reach[:INT8_TRIES]:
            if not self._affords(candidates, f"the candidate keeping {fraction:g} with int8"):
                break
            self._report(candidates, plans, f"scoring the candidate keeping {fraction:g} "
                                            "with int8")
            candidate = self._quantized(fraction, plan, "int8")
            if candidate is None:
                # int8 of the original with low-rank weights: as large, as fast, less faithful
                self.job.log.info(f"target: the candidate keeping {fraction:g} with int8 is not "
                                  "scored: every compressed layer is exported dense with int8, "
                                  "so it is int8 of the original with low-rank weights")
                continue
            candidates.append(candidate)
            if candidate.meets_floor:
                break
        self._walk_int4(candidates, in_reach)
        self._original_quantized(candidates, plans, dense, "int4")
        if (self.target.objective == "latency" and self.config.export.int8_smoothing is not None
                and self._affords(candidates, "the original with int8, unsmoothed")):
            # the fastest int8 of all may be the one without the smoothing's Mul nodes
            candidates.append(self._quantized(1.0, dense, "int8", smoothed=False))
        if shared.compressed and self._affords(candidates, "the shared-values candidate"):
            self._report(candidates, plans, "scoring the shared-values candidate")
            candidates.append(self._shared(shared))
        if self.target.objective == "latency":
            self._time_floats(candidates)
        for c in candidates:
            timed = f", {c.latency_ms:.3g} ms" if c.latency_ms is not None else ""
            self.job.log.info(f"target: {c.name}, {c.bytes:,} bytes{timed}: "
                              f"{describe_fidelity(c.fidelity)}"
                              f"{' (meets the floor)' if c.meets_floor else ''}")
        return candidates

    def _original_quantized(self, candidates: list[Candidate], plans: list, dense: Plan,
                            quantize: str) -> None:
        """Score the original itself with `quantize`, appending it to `candidates`, if the time
        budget affords it: when it keeps the floor and no candidate is smaller, it is the
        honest answer. int4 is an option, not a requirement: on a model it does not apply to
        (no MatMul weight), it is only logged."""
        if not self._affords(candidates, f"the original with {quantize}"):
            return
        self._report(candidates, plans, f"scoring the original with {quantize}")
        try:
            candidates.append(self._quantized(1.0, dense, quantize))
        except ExportError as exc:
            if quantize != "int4":
                raise
            self.job.log.info(f"target: int4 of the original not scored: {exc.message}")

    def _walk_floats(self, candidates: list[Candidate], plans: list[tuple[float, Plan]]) -> None:
        """Score the budgets in float, largest first, appending them to `candidates`, down to
        the first that is beyond fine-tuning's reach of the floor: a smaller budget only loses
        more, and no candidate beyond reach is ever fine-tuned (nor is its int8 or int4, which
        lose more still)."""
        for index, (fraction, plan) in enumerate(reversed(plans)):
            if not self._affords(candidates, f"the candidate keeping {fraction:g}"):
                break
            self.job.control.report(PLANNING, index / (2 * len(plans)),
                                    f"scoring the candidate keeping {fraction:g}")
            candidates.append(self._float(fraction, plan))
            if not within_reach(candidates[-1].fidelity, self.target):
                left = len(plans) - index - 1
                if left:
                    self.job.log.info(f"target: the {left} smaller budgets are not scored: the "
                                      f"candidate keeping {fraction:g} is beyond fine-tuning's "
                                      "reach of the floor, and they only lose more")
                break

    def _walk_int4(self, candidates: list[Candidate], plans: list[tuple[float, Plan]]) -> None:
        """Score int4 candidates from the first budget int8 was scored at upward, appending
        them to `candidates`: at most `INT4_TRIES`, until one meets the floor or costs no less
        (by the objective) than the cheapest candidate that already does (a larger budget only
        costs more).

        int4 loses more than int8 at the same budget (all-MiniLM-L6-v2's original: held-out
        cosine 0.972 to int8's 0.991; the tiny test models' relative L2 0.11 to 0.016), so a
        budget whose int8 candidate is beyond fine-tuning's reach of the floor is skipped.
        int4 applies to MatMul weights and tables only: on a model with none, it is skipped.
        """
        int8 = {c.kept_fraction: c for c in candidates if c.quantize == "int8"}
        tried = 0
        for fraction, plan in plans:
            if tried == INT4_TRIES:
                break
            scored = int8.get(fraction)
            if scored is not None and not (scored.meets_floor
                                           or within_reach(scored.fidelity, self.target)):
                continue
            if not self._affords(candidates, f"the candidate keeping {fraction:g} with int4"):
                break
            tried += 1
            self._report(candidates, plans, f"scoring the candidate keeping {fraction:g} "
                                            "with int4")
            try:
                candidate = self._quantized(fraction, plan, "int4")
            except ExportError as exc:  # e.g. no MatMul weight in the compact form either
                self.job.log.info(f"target: no int4 candidates scored: {exc.message}")
                return
            candidates.append(candidate)
            objective = self.target.objective
            cheapest = min((c.cost(objective) for c in candidates if c.meets_floor),
                           default=float("inf"))
            cost = candidate.cost(objective)
            if candidate.meets_floor or cheapest <= cost < float("inf"):
                break

    def _report(self, candidates: list[Candidate], plans: list, message: str) -> None:
        """Report the planning stage's progress while quantized candidates are scored."""
        self.job.control.report(PLANNING, min(0.95, 0.5 + 0.5 * len(candidates)
                                              / (3 * max(1, len(plans)))), message)

    def _time_floats(self, candidates: list[Candidate]) -> None:
        """Export and time each float candidate the objective may pick: those that meet the
        floor or are within reach of it, but those timed as they were scored (`_timed`)."""
        timed = [c for c in candidates if c.quantize is None and c.latency_ms is None
                 and (c.meets_floor or within_reach(c.fidelity, self.target))]
        for index, candidate in enumerate(timed):
            if not self._affords(candidates, f"timing the candidate keeping "
                                             f"{candidate.kept_fraction:g}"):
                break
            self.job.control.report(PLANNING, 0.96 + 0.04 * index / len(timed),
                                    f"timing the candidate keeping {candidate.kept_fraction:g}")
            candidate.bytes, candidate.latency_ms, candidate.shipped_file = self._measured(
                self._student(candidate.plan), candidate.plan, timed=True)
            candidate.bytes_estimated = False

    def _latency_ms(self, path: Path) -> float:
        """Return onnxruntime's latency (ms) of the model at `path` at the target's batch size
        (batch 1 when one run at it costs too much), on held-out samples."""
        return self._latencies_ms({"model": path}, CANDIDATE_LATENCY_SECONDS)["model"]

    def _latencies_ms(self, paths: dict[str, Path], seconds: float) -> dict[str, float]:
        """Return each model's median latency (ms) as `_latency_ms` times it, the models timed
        in turn (`onnx_latencies_ms`), `seconds` of runs each."""
        timings = onnx_latencies_ms(paths, self._latency_batch(), seconds)
        return {name: timing.median for name, timing in timings.items()}

    def keep(self, path: Path) -> Path:
        """Keep the ONNX model at `path` (a scratch file about to be removed) until the
        finalists are ordered, for timing it again in turn; return where it is kept. Hard links
        (copies across file systems), in a folder of the job's scratch space."""
        if self.kept_files is None:
            self.kept_files = Path(tempfile.mkdtemp(prefix="timed-",
                                                    dir=self.job.scratch or self.workdir))
        folder = Path(tempfile.mkdtemp(dir=self.kept_files))
        for source in onnx_files(path):
            try:
                os.link(source, folder / source.name)
            except OSError:
                shutil.copy2(source, folder / source.name)
        return folder / path.name

    def drop_kept_files(self) -> None:
        """Remove the files kept as timed: the finalists are ordered."""
        if self.kept_files is not None:
            shutil.rmtree(self.kept_files, ignore_errors=True)
            self.kept_files = None

    def _latency_batch(self) -> dict[str, torch.Tensor]:
        """Return the held-out samples a candidate is timed on: the target's latency batch
        (one sample when a run at it costs too much)."""
        kept, _ = self.job.costs.latency_batches((self.target.latency_batch,))
        size = kept[0] if kept else 1
        held_out = self.loaded.held_out
        return held_out.take(torch.arange(size) % len(held_out))

    def _student(self, plan: Plan) -> fx.GraphModule:
        budget = self.job.control.budget
        started = budget.elapsed_s()
        student = build_student(self.loaded, PlannedJob(plan, dict(self.stats)),
                                self.config.finetune.grad_reduction, self.job,
                                thetas=self.thetas)
        self.built_s[id(plan)] = budget.elapsed_s() - started
        return student

    def fallback_s(self, training: Candidate, untried: list[Candidate],
                   candidates: list[Candidate]) -> float:
        """Return the seconds to keep aside while `training` is fine-tuned under a time
        budget: what shipping one of `untried` (finalists that met the floor as initialized)
        untrained would take, should `training` miss the floor once the budget is spent: its
        student built, and scored in PyTorch unless the search already scored it or its float
        twin (`_scored_as_initialized`). Its build in the search is the estimate (a rebuild
        reuses the corrected θ: no longer), or the longest build for one an earlier try scored.
        On Gemma-3 270M that was 35 s the budget did not keep (int8 of the original: 1.3 s
        built, 30.5 s scored). 0 without a budget or untried."""
        budget = self.job.control.budget
        if not budget.limited or not untried:
            return 0.0
        longest = max(self.built_s.values(), default=0.0)
        return max(self.built_s.get(id(c.plan), longest)
                   + (0.0 if _scored_as_initialized(c, candidates, self.loaded)
                      else self.scoring_s) for c in untried)

    def _parameters(self, plan: Plan) -> int:
        """Return the parameters of `plan`'s exported model (a layer exported dense: its W)."""
        dense = sum(p.layer.numel - p.compact_numel for p in plan.compressed
                    if p.layer.name in plan.dense_exports)
        return round(self.other_parameters - plan.targeted_numel + plan.kept_numel + dense)

    def exported(self, plan: Plan, quantize: str | None) -> Plan:
        """Return `plan` as its candidate is exported: with objective latency, each compressed
        matmul layer factorized only where onnxruntime runs that faster than its dense weight
        (`LayerForms`, measured once per shape on the latency batch's rows); else as it is."""
        if self.target.objective != "latency" or not plan.compressed:
            return plan
        if self.forms is None:
            self.forms = LayerForms(layer_rows(self.loaded.teacher,
                                               [p.layer for p in plan.layers],
                                               self._latency_batch()))
        measured = self.forms.measured(plan, quantize)
        if measured.dense_exports:
            self.job.log.info(
                f"target: {len(measured.dense_exports)} of {len(plan.compressed)} compressed "
                f"layers exported dense{f' with {quantize}' if quantize else ''}: onnxruntime "
                "runs them no faster factorized at their ranks")
        return measured

    def _scored(self, student: fx.GraphModule) -> tuple[dict[str, dict[str, Any]], float]:
        """Return `student`'s fidelity to the original on the held-out split, in PyTorch, and
        its held-out score."""
        budget = self.job.control.budget
        started = budget.elapsed_s()
        figures, score = fidelity(student, self.held_out, self.loaded.kinds,
                                  self.loaded.next_token)
        self.scoring_s = max(self.scoring_s, budget.elapsed_s() - started)
        return fidelity_by_output(figures, self.loaded.output_names), score

    def _float(self, fraction: float, plan: Plan) -> Candidate:
        plan = self.exported(plan, None)
        scored, score = self._scored(self._student(plan))
        parameters = self._parameters(plan)
        return self._logged(Candidate(fraction, None, parameters, 4 * parameters, scored,
                                      self.target.met_by(scored), bytes_estimated=True,
                                      held_out_score=score, plan=plan))

    def _shared(self, plan: Plan) -> Candidate:
        """Score the shared-values candidate in float; its bytes are measured (one-byte
        indices: 4 bytes a number would count them four times)."""
        student = self._student(plan)
        scored, score = self._scored(student)
        size, latency, kept = self._measured(student, plan, self._timed(scored))
        return self._logged(Candidate(plan.kept_numel / max(1, plan.targeted_numel), None,
                                      self._parameters(plan), size, scored,
                                      self.target.met_by(scored), latency_ms=latency,
                                      method="share_values", held_out_score=score, plan=plan,
                                      shipped_file=kept))

    def _quantized(self, fraction: float, plan: Plan, quantize: str,
                   smoothed: bool = True) -> Candidate | None:
        """Score `plan` with `quantize` stacked; None (not scored) when the latency objective
        exports every layer it compresses dense: that is the original quantized with low-rank
        weights, as large and as fast as the original quantized, and less faithful."""
        plan = self.exported(plan, quantize)
        if _all_dense(plan):
            return None
        # the student is built here and held by nothing else: freed once it is exported
        scored, size, latency, kept = self.quantized_fidelity(self._student(plan), plan,
                                                              quantize, smoothed, keep=True)
        return self._logged(Candidate(fraction, quantize, self._parameters(plan), size, scored,
                                      self.target.met_by(scored), latency_ms=latency,
                                      unsmoothed=quantize == "int8" and not smoothed,
                                      plan=plan, shipped_file=kept))

    def _logged(self, candidate: Candidate) -> Candidate:
        """Log that `candidate` was scored, with the memory the search holds then (what each
        kind of candidate costs it: a language model's search peaked at 10.5 GiB, 10x its
        weights, unexplained by stage peaks alone), and return it."""
        self.job.log.info(f"target: scored {candidate.name}: "
                          f"{describe_fidelity(candidate.fidelity)}; {self.job.log.memory_now()}")
        return candidate

    def quantized_fidelity(self, student: fx.GraphModule, plan: Plan, quantize: str,
                           smoothed: bool = True, keep: bool = False,
                           ) -> tuple[dict[str, dict[str, Any]], int, float | None, Path | None]:
        """Export `student`'s compact form, quantize it (`quantize`: "int8" or "int4"; int8
        from a smoothed copy unless `smoothed` is False) and score it in onnxruntime; return
        its fidelity, its bytes and, when `_timed`, its latency (else None) and, with `keep`,
        where its file is kept (`keep`; else None). The student is left as it was."""
        shipping = self._shipped(student, plan, quantize, smoothed)
        del student  # held by the export until it is written (see `_exported`)
        with shipping as quantized:
            scored = fidelity_by_output(onnx_fidelity(quantized, self.held_out, self.loaded.kinds,
                                                  self.loaded.next_token),
                                    self.loaded.output_names)
            if not self._timed(scored):
                return scored, onnx_bytes(quantized), None, None
            return (scored, onnx_bytes(quantized), self._latency_ms(quantized),
                    self.keep(quantized) if keep else None)

    def _timed(self, scored: dict[str, dict[str, Any]]) -> bool:
        """Whether a candidate that scored `scored` is timed while its file is at hand: by
        objective latency when it is within reach of the floor (it may be picked for its
        speed), by objective size when it meets the floor (it may tie with another on size:
        `fastest_first`)."""
        if self.target.objective == "latency":
            return within_reach(scored, self.target)
        return self.target.met_by(scored)

    @contextlib.contextmanager
    def _shipped(self, student: fx.GraphModule, plan: Plan, quantize: str | None,
                 smoothed: bool = True) -> Iterator[Path]:
        """Export `student`'s compact form as it would ship: quantized (`quantize`; int8 from
        a smoothed copy unless `smoothed` is False) or not, into a scratch folder removed
        after."""
        exporting = self._exported(student, plan, smoothed=smoothed and quantize == "int8")
        del student  # held by the export until it is written (see `_exported`)
        with exporting as exported:
            if quantize is None:
                yield exported
                return
            quantized = exported.parent / quantize / ONNX_ARTIFACT
            quantized.parent.mkdir()
            QUANTIZERS[quantize](exported, quantized)
            yield quantized

    def fastest_first(self, meeting: list[Candidate]) -> list[Candidate]:
        """Return `meeting` (smallest first) with those within `SIZE_TIE` of the smallest's
        bytes put fastest first, timed in turn with the smallest (`in_turn`); as it is when
        fewer than two are that close, or when the time budget is spent (then the smallest
        goes first, and the cut is recorded)."""
        tied = [c for c in meeting if c.bytes <= (1 + SIZE_TIE) * meeting[0].bytes]
        if len(tied) < 2 or not self._affords_timing(
                f"{len(tied)} finalists within {SIZE_TIE:.0%} of the smallest's bytes not timed "
                "in turn: the smallest was tried first"):
            return meeting
        self.in_turn(tied[0], tied[1:])
        ordered = sorted(tied, key=lambda c: c.latency_ms)
        self.job.log.info(
            f"target: {len(tied)} candidates meet the floor within {SIZE_TIE:.0%} of the "
            f"smallest's bytes; the fastest is tried first (timed in turn): "
            + ", ".join(f"{c.name} ({c.bytes:,} bytes, {c.latency_ms:.3g} ms)" for c in ordered))
        return ordered + meeting[len(tied):]

    def fastest_in_turn(self, near: list[Candidate], meeting: list[Candidate],
                        ) -> tuple[list[Candidate], list[Candidate]]:
        """Objective latency: return `near` and `meeting` (each fastest first, as timed in the
        walk) in the order their finalists are tried, after timing again in turn with the
        fastest that meets the floor (`in_turn`) those faster than it (`near`) and those that
        meet it within `LATENCY_TIE` of its latency: a `near` one timed no faster than the
        fastest that meets the floor is not fine-tuned (it could not win). As they are when the
        time budget is spent (the cut is recorded)."""
        if not meeting:
            return near, meeting
        fastest = meeting[0]
        close = [c for c in meeting[1:]
                 if c.latency_ms is not None and fastest.latency_ms is not None
                 and c.latency_ms <= (1 + LATENCY_TIE) * fastest.latency_ms]
        contenders = near + close
        if not contenders or not self._affords_timing(
                f"{len(contenders)} finalists not timed again in turn with the fastest that "
                "met the floor: tried as timed one after another"):
            return near, meeting
        self.in_turn(fastest, contenders)
        meeting = sorted(meeting, key=lambda c: c.cost("latency"))
        faster = [c for c in near if c.latency_ms < meeting[0].latency_ms]
        self.job.log.info(
            "target: timed in turn with the fastest that met the floor: "
            + ", ".join(f"{c.name} {c.latency_ms:.3g} ms" for c in [fastest, *contenders])
            + "".join(f"; {c.name} is not fine-tuned: no faster than {meeting[0].name}"
                      for c in near if c not in faster))
        return sorted(faster, key=lambda c: c.latency_ms), meeting

    def _affords_timing(self, cut: str) -> bool:
        """Whether the time budget leaves time to time finalists again; if not, record `cut`."""
        budget = self.job.control.budget
        if budget.affords(0):
            return True
        budget.cut(cut)
        return False

    def in_turn(self, bar: Candidate, others: list[Candidate]) -> None:
        """Time each of `others` in turn with `bar` (the two files open together, their runs
        alternating: `onnx_latencies_ms`) and set its `latency_ms` to its median over `bar`'s in
        the same rounds, times `bar`'s median in the first: what the machine did between one
        candidate's timing and the next weighs out. `bar`'s is set to that first median. A file
        kept as the candidate was timed is used; one that was not (a float candidate's bytes
        estimated, or one an earlier try scored) is exported again."""
        with contextlib.ExitStack() as files:
            bar_file = self._file_of(bar, files)
            reference = None
            for other in others:
                timed = self._latencies_ms({"bar": bar_file, "other": self._file_of(other, files)},
                                           IN_TURN_LATENCY_SECONDS)
                if reference is None:
                    reference = bar.latency_ms = timed["bar"]
                other.latency_ms = timed["other"] * reference / timed["bar"]

    def _file_of(self, candidate: Candidate, files: contextlib.ExitStack) -> Path:
        """Return `candidate`'s ONNX file as it ships: the one kept when it was timed, or one
        exported now, kept until `files` closes."""
        if candidate.shipped_file is not None and candidate.shipped_file.is_file():
            return candidate.shipped_file
        return files.enter_context(self._shipped(self._student(candidate.plan), candidate.plan,
                                                 candidate.quantize, not candidate.unsmoothed))

    def _expect_finishing(self, export_s: float) -> None:
        """Keep what a candidate's export (`export_s`) says the artifact's export, verification
        and report need, when that is more than the reserve the model's size gave."""
        budget = self.job.control.budget
        needed = finishing_reserve_after_s(export_s, self.config.export.latency_seconds)
        if budget.limited and budget.reserve_at_least(needed):
            self.job.log.info(f"time budget: a candidate's export took {export_s:.0f} s; "
                              f"{needed:.0f} s are now kept for the artifact's export, "
                              "verification and the report")

    def exported_bytes(self, student: fx.GraphModule, plan: Plan) -> int:
        """Return the bytes of `student`'s compact form exported to ONNX."""
        return self._measured(student, plan, timed=False)[0]

    def _measured(self, student: fx.GraphModule, plan: Plan, timed: bool,
                  ) -> tuple[int, float | None, Path | None]:
        """Return the bytes of `student`'s compact form exported to ONNX, and, when `timed`,
        its latency (`_latency_ms`) and where its file is kept (`keep`), else None twice."""
        with self._exported(student, plan) as exported:
            if not timed:
                return onnx_bytes(exported), None, None
            return onnx_bytes(exported), self._latency_ms(exported), self.keep(exported)

    @contextlib.contextmanager
    def _exported(self, student: fx.GraphModule, plan: Plan,
                  smoothed: bool = False) -> Iterator[Path]:
        """Export `student`'s compact form (`smoothed`: as int8 will quantize it, see
        `export.int8_smoothing`) into a scratch folder, removed after."""
        module = materialized(student, self.loaded.teacher, plan, "factorized")
        alpha = self.config.export.int8_smoothing
        if smoothed and alpha is not None:
            module = smoothed_for_int8(module, smoothing_batches(self.loaded), alpha)
        held_out = self.loaded.held_out
        sample = held_out.take(torch.arange(min(2, len(held_out))))
        scratch = Path(tempfile.mkdtemp(prefix=".target-", dir=self.workdir))
        try:
            exported = scratch / ONNX_ARTIFACT
            budget = self.job.control.budget
            started = budget.elapsed_s()
            export_onnx(module, sample, self.loaded.specs, exported, self.config.export.opset)
            self._expect_finishing(budget.elapsed_s() - started)
            # The file holds it now: a student that nothing else holds (a budget's, scored) and
            # the smoothed copy's scaled weights are freed before it is quantized and scored.
            del module, student
            gc.collect()  # GraphModules sit in reference cycles
            yield exported
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

