"""Target mode: the smallest (or fastest) model that keeps a stated fidelity, found by one search.

A job with a `target` states what it must keep (a floor per output kind) instead of a ratio.
The search calibrates and decomposes once, then walks the candidates that calibration makes
cheap to build: each budget (kept fraction of the targeted weights, spread by sensitivity along
the allocation's greedy path), in float or with onnxruntime's quantization stacked on its
compact form (int8 dynamic, int4 weight-only), and int8 and int4 of the original itself (kept
fraction 1: when one keeps the floor and nothing smaller does, it is what a user should take).
int8 of the original is scored first, the bar every compressed candidate has to clear; then
the budgets, largest first, down to the first beyond fine-tuning's reach of the floor (a
smaller one only loses more; int8 and int4 of it more still). Each candidate is initialized
(θ from the decompositions, corrected sequentially) and scored on the held-out split against
the original: in PyTorch for the float form, on the real
quantized ONNX model for the others. Fine-tuning then goes to the finalists, smallest first:
candidates that miss the floor by little as initialized (within fine-tuning's reach, `REACH`)
and are smaller than the smallest that meets it, then those that meet it. An int8 finalist
trains through int8 arithmetic, simulated (`compressor.finetune.quantization_aware`), when it
is quantized unsmoothed, or when what its smoothed int8 costs is beyond float fine-tuning's
reach of the floor (`_through_int8`); an int4 one trains in float (nothing simulates
MatMulNBits' 4-bit blocks), and is not tried when its int4 alone is beyond the floor. A finalist's fine-tuning ends at the first held-out evaluation that keeps the floor
(in float, by the margin its quantization took as initialized): `finetune.steps` is the most it
takes. Each is checked again after fine-tuning (a quantized one on its real quantized
model), and the first that meets the floor is the one handed on to export. When none does,
the job fails with `target_not_met`, giving the best fidelity reached and at what size.
Candidates that meet the floor within `SIZE_TIE` of the smallest one's bytes are as small as
it: each candidate that meets the floor is timed as it is scored, and of those the fastest is
tried first, timed again in turn with the smallest (`Scout.in_turn`).

With objective `latency` the order is by onnxruntime latency at the target's batch size
instead of bytes: every candidate that meets the floor or is within reach of it is exported
(quantized ones already are) and timed, and the fastest is fine-tuned first. Its budgets are
then shares of what the targeted layers cost to run (`latency_costs`: multiply-adds, each
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
What a candidate is and which exist: `compressor.search.candidates`; scoring and timing them,
as initialized: `compressor.search.scout`; fine-tuning the finalists and choosing: here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import fx

from compressor.config import CompressionConfig, ExportConfig, TargetConfig
from compressor.errors import ConfigError, TargetNotMetError
from compressor.export.stage import int8_input_scales
from compressor.finetune.loop import FloorCheck, HeldOut
from compressor.finetune.stage import (
    EVAL_BATCH,
    TrainedJob,
    as_initialized,
    fidelity,
    finetune,
)
from compressor.load.stage import LoadedJob
from compressor.plan.allocation import sensitivities_of
from compressor.plan.stage import PlannedJob
from compressor.rewrite.kept import CorrectedThetas
from compressor.rewrite.stage import rewrite
from compressor.runtime.budget import TimeBudget
from compressor.runtime.context import JobContext
from compressor.runtime.outputs import (
    OutputFidelity,
    describe_fidelity,
    fidelity_by_output,
)
from compressor.search.candidates import (
    Candidate,
    budget_plans,
    dense_plan,
    float_twins,
    latency_costs,
    quantization_loss_beyond_floor,
    scored_as_initialized,
    shared_values_plan,
    within_reach,
)
from compressor.search.kept import KeptSearch
from compressor.search.scout import Scout
from compressor.vocabulary import PLANNING

# Candidates within reach tried at most before the smallest that meets the floor.
REACH_TRIES = 2
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
class SearchResult:
    """What target mode chose, and every candidate it weighed."""

    planned: PlannedJob
    trained: TrainedJob
    export: ExportConfig  # the export form and quantization of the chosen candidate
    chosen: Candidate
    candidates: list[Candidate]
    tries: list[dict[str, Any]]  # each fine-tuned finalist and its fidelity after
    target: TargetConfig
    # candidates left out because the machine lacked the memory to score them, and why
    not_scored: list[str] = field(default_factory=list)
    # the chosen candidate's quantized model as the search scored it, when its θ has not
    # changed since (not fine-tuned, or no step improved on it): the artifact's quantized form,
    # which the export then need not make again (Gemma-3 270M: 107 s of smoothing, export and
    # quantization, and onnxruntime's quantizer's 4.9 GiB); None otherwise
    scored_file: Path | None = None

    def summary(self) -> dict[str, Any]:
        """Return the search as plain data for the report."""
        return {"objective": self.target.objective, "floors": self.target.floors(),
                "export": {"form": self.export.form, "quantize": self.export.quantize},
                "chosen": self.chosen.summary(),
                "candidates": [c.summary() for c in self.candidates], "tries": self.tries,
                "not_scored": self.not_scored}


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
        scout = Scout(loaded, stats, held_out, config, target, workdir, job, thetas)
        dense, costs = dense_plan(plan), None
        if target.objective == "latency":
            plan, costs = latency_costs(plan, stats, job)
        plans = budget_plans(plan, prepared, sensitivities, costs)
        shared = shared_values_plan(dense)
        kept = KeptSearch(job, plans, dense, shared, held_out.batch_size)  # what a retry reuses
        candidates = kept.candidates(Candidate)
        if candidates is None:
            candidates = scout.walk(plans, dense, shared)
            # a search the budget or the memory cut is not what a retry should reuse
            if not scout.cut and not scout.not_scored:
                kept.save_candidates(candidates)
    budget = job.control.budget
    if not candidates:
        raise TargetNotMetError(
            ("no candidate was scored" if scout.cut else "no candidate smaller than the "
             "original could be planned for this model; set `ratio` to compress it to a size "
             "you choose") + _cut_note(budget) + _memory_note(scout))
    near, meeting = _finalists(candidates, target, config.export, job)
    if not near and not meeting:
        scout.drop_kept_files()
        raise TargetNotMetError(_not_met(candidates, target, fine_tuned=False)
                                + _cut_note(budget) + _memory_note(scout))
    tries: list[dict[str, Any]] = []
    late = False  # a finalist was tried with the budget spent: no other will be
    near, meeting = _in_order(near, meeting, scout)
    untried = list(meeting)  # those that ship untrained should the budget run out, in turn
    for candidate in near + meeting:
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
        through_int8 = not late and _through_int8(candidate, candidates, target, config.export)
        shipped = scales = None
        if late or untrainable:
            # No step is taken: nothing is set up for training (the original's top k on the
            # held-out split, the training split's targets, the int8 simulation), and θ is the
            # one scored as a candidate, on the search's held-out outputs (Gemma-3 270M: 158 s
            # of passes over its held-out windows for a finalist shipped as initialized). A
            # student that compresses no layer is the original: its float figures are read off
            # the original's held-out outputs (a random-weight BERT-base: a pass of 53-63 s).
            scored = (fidelity(None, held_out, loaded.kinds, loaded.next_token) if untrainable
                      else scored_as_initialized(candidate, candidates, loaded))
            trained = as_initialized(
                loaded, student, held_out, job,
                f"fine-tuning skipped: candidate {candidate.name} compresses no layer, so it "
                "has nothing to train" if untrainable else
                f"fine-tuning skipped: the search spent the time budget; candidate "
                f"{candidate.name} ships as initialized", scored)
        else:
            if through_int8 and _smoothed(candidate, config.export):
                # the factors the export will smooth by, measured on θ as initialized
                scales = int8_input_scales(loaded, student, candidate.plan, config.export)
            if candidate.quantize is not None:
                shipped = _ShippedScore(scout, student, candidate, job, scales)
            if fallback_s:
                job.log.info(f"target: {fallback_s:.0f} s kept while {candidate.name} is "
                             f"fine-tuned, to ship {untried[0].name} untrained should it miss "
                             "the floor with the budget spent")
            with budget.keeping(fallback_s):
                trained = finetune(loaded, candidate.plan, student,
                                   config.finetune.model_copy(
                                       update={"quantization_aware": through_int8}), job,
                                   enough=_floor_check(candidate, candidates, target, loaded,
                                                       through_int8, shipped),
                                   int8_input_scales=scales)
        del student
        as_scored = candidate.quantize is not None and (late or trained.summary.best_step == 0)
        if as_scored:
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
                                               smoothed=not candidate.unsmoothed,
                                               scales=scales)[0]
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
            # θ as scored: the quantized file the search scored is the artifact's
            scored_file = (candidate.shipped_file if as_scored and candidate.shipped_file
                           is not None and candidate.shipped_file.is_file() else None)
            scout.drop_kept_files(keeping=[candidate] if scored_file is not None else [])
            return SearchResult(planned, trained, export, candidate, candidates, tries, target,
                                scout.not_scored, scored_file)
        kept.keep_miss(tries[-1])
        # the missed finalist's student and fine-tuning split go before the next is built
        # (they stayed alive through its rewriting and fine-tuning)
        del trained, shipped
    raise TargetNotMetError(_not_met(candidates, target, fine_tuned=True, tries=tries)
                            + _cut_note(budget) + _memory_note(scout))


class _ShippedScore:
    """Score `candidate`'s real quantized model as `student`'s θ is when called (fine-tuning
    trains that θ in place; its int8 smoothed by `scales` when given: those it learns
    through), logging each miss and keeping the last figures (`last`: those fine-tuning ended
    on, when it ended at the floor)."""

    def __init__(self, scout: Scout, student: fx.GraphModule, candidate: Candidate,
                 job: JobContext, scales: dict[str, torch.Tensor] | None = None) -> None:
        self.scout, self.student, self.candidate, self.job = scout, student, candidate, job
        self.scales = scales
        self.last: dict[str, dict[str, Any]] | None = None

    def __call__(self) -> dict[str, dict[str, Any]]:
        candidate = self.candidate
        self.last = self.scout.quantized_fidelity(self.student, candidate.plan,
                                                  candidate.quantize,
                                                  smoothed=not candidate.unsmoothed,
                                                  scales=self.scales)[0]
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
    kept the floor in float at step 25 by its margin, and its int4 model did not). A candidate
    that met the floor as scored ends at its first evaluation anyway, with θ as initialized
    when no step improved on it. None (every step) when that margin was not measured."""
    needed = dict.fromkeys(candidate.fidelity, 0.0)
    if candidate.quantize is not None and not simulated:
        floats = float_twins(candidate, candidates)
        if not floats:
            return None
        needed = {name: max(0.0, target.margin(floats[0].fidelity[name]) - target.margin(figures))
                  for name, figures in candidate.fidelity.items()}

    def kept(fidelity: list[OutputFidelity]) -> bool:
        by_output = fidelity_by_output(fidelity, loaded.output_names)
        return all(target.margin(figures) >= needed[name] for name, figures in by_output.items())

    return FloorCheck(loaded.next_token, kept,
                      None if shipped is None else lambda: target.met_by(shipped()),
                      kept_as_initialized=candidate.meets_floor)


def _cut_note(budget: TimeBudget) -> str:
    """Return what the time budget cut, for a `target_not_met` message ('' when nothing)."""
    if not budget.cuts:
        return ""
    return (f". The time budget cut the search ({budget.describe()}: "
            f"{'; '.join(budget.cuts)}): raise max_minutes to let it go further")


def _memory_note(scout: Scout) -> str:
    """Return which candidates the machine lacked the memory to score, for a `target_not_met`
    message ('' when none)."""
    if not scout.not_scored:
        return ""
    return (f". Not scored for lack of memory: {'; '.join(scout.not_scored)}: run the job on a "
            "machine with more memory to let the search weigh them")


def _finalists(candidates: list[Candidate], target: TargetConfig, export: ExportConfig,
               job: JobContext) -> tuple[list[Candidate], list[Candidate]]:
    """Return the candidates to fine-tune: those within fine-tuning's reach that cost less (by
    the objective: smaller, or faster) than the cheapest meeting the floor (cheapest first, at
    most `REACH_TRIES`), and those meeting it, cheapest first (`_in_order` orders them). An int4
    one is not within reach when its quantization alone costs more than the floor leaves
    (`quantization_loss_beyond_floor`; logged): it can only learn in float. A smoothed int8 one
    then learns through its int8 instead (`_through_int8`; logged)."""
    def cost(candidate: Candidate) -> float:
        return candidate.cost(target.objective)

    meeting = sorted((c for c in candidates if c.meets_floor), key=cost)
    cheapest = cost(meeting[0]) if meeting else float("inf")
    # the original quantized (kept fraction 1) has no θ: fine-tuning cannot bring it nearer
    near = sorted((c for c in candidates if not c.meets_floor and cost(c) < cheapest
                   and c.kept_fraction < 1.0 and within_reach(c.fidelity, target)), key=cost)
    reachable = []
    for candidate in near:
        beyond = quantization_loss_beyond_floor(candidate, candidates, target)
        if beyond is None:
            reachable.append(candidate)
        elif candidate.quantize == "int8":
            reachable.append(candidate)
            if _smoothed(candidate, export):
                job.log.info(f"target: {candidate.name} learns through its smoothed int8, not in "
                             f"float: {beyond}")
        else:
            job.log.info(f"target: {candidate.name} is not fine-tuned: {beyond}")
    return reachable[:REACH_TRIES], meeting


def _through_int8(candidate: Candidate, candidates: list[Candidate], target: TargetConfig,
                  export: ExportConfig) -> bool:
    """Whether a finalist learns through the int8 arithmetic it ships in, simulated
    (`compressor.finetune.quantization_aware`), rather than in float.

    Unsmoothed int8 does. int4 does not: nothing simulates MatMulNBits' 4-bit blocks, so an
    int4 finalist is judged on its real int4 model after. Smoothed int8 (`int8_smoothing`,
    simulated with the factors measured on θ as initialized, which the export then smooths by)
    does only where what int8 cost it puts it beyond the floor for float fine-tuning
    (`quantization_loss_beyond_floor`): on all-MiniLM-L6-v2, where int8 costs ~0.003 cosine,
    learning through it reached no more than float did (kept 0.8: cosine 0.9878 against 0.9883
    after 300 steps; kept 0.9: 0.9923 against 0.9926) at 1.4× the time a step; on Gemma-3 270M
    at ratio 0.8, where int8 costs a factor 1.19 of perplexity, it reached 1.21× the original's
    perplexity after 300 steps where float then int8 reached 1.41×."""
    if candidate.quantize != "int8":
        return False
    return (not _smoothed(candidate, export)
            or quantization_loss_beyond_floor(candidate, candidates, target) is not None)


def _smoothed(candidate: Candidate, export: ExportConfig) -> bool:
    """Whether an int8 candidate's int8 is quantized from a smoothed copy."""
    return not candidate.unsmoothed and export.int8_smoothing is not None


def _in_order(near: list[Candidate], meeting: list[Candidate], scout: Scout,
              ) -> tuple[list[Candidate], list[Candidate]]:
    """Return `near` and `meeting` in the order their finalists are tried (`near` first);
    objective size: those as small as the smallest (`SIZE_TIE`) fastest first; objective
    latency: by their latency timed again in turn (`Scout.fastest_in_turn`), the `near` ones
    only when faster than the fastest that meets the floor. The first of `meeting` not tried
    yet is the one that ships untrained should the budget run out (Gemma-3 270M's log named
    the smallest, the shared values at 1.4 s a batch, where int8 of the original, 0.5 s and
    0.3 % larger, was next in turn). A candidate not timed as it was scored is timed only
    when the finalists come to it."""
    if scout.target.objective == "latency":
        near, meeting = scout.fastest_in_turn(near, meeting)
    else:
        meeting = scout.fastest_first(meeting)
    scout.drop_kept_files(keeping=meeting)  # one of them may ship as it was scored
    return near, meeting


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
