"""Target mode's scout: initialize, score and time candidates cheaply, one student at a time.

The walk (`Scout.walk`) scores int8 of the original first (the bar every compressed candidate
has to clear), then the budgets in float, largest first, down to the first beyond fine-tuning's
reach of the floor, then int8 stacked on the budgets within reach, int4 of the original, int4
stacked on those budgets (unless int4 of the original is beyond reach) and the shared-values
candidate. A float candidate is scored in PyTorch, a quantized one on its
real quantized ONNX model. Timings that decide between finalists are taken in turn
(`Scout.in_turn`): one file timed after another moved by more than what separated them.
A quantized or shared-values candidate the machine lacks the memory to score (onnxruntime's
quantizers and the k-means hold a model several times over: `compressor.runtime.memory`) is
left out, saying why (`Scout._fits`), rather than have the kernel kill the job.
No candidate is fine-tuned here: `compressor.search.target` does that to the finalists.
"""

from __future__ import annotations

import contextlib
import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import fx

from compressor.config import CompressionConfig, TargetConfig
from compressor.errors import ExportError, ResourceError
from compressor.export.onnx import export_onnx, onnx_bytes, onnx_files
from compressor.export.smoothing import divided_inputs, smoothed_for_int8
from compressor.export.stage import QUANTIZERS, materialized, onnx_fidelity, smoothing_batches
from compressor.finetune.loop import HeldOut
from compressor.finetune.stage import (
    fidelity,
)
from compressor.load.stage import LoadedJob
from compressor.plan.planning import Plan
from compressor.plan.stage import PlannedJob
from compressor.report.figures import onnx_latencies_ms
from compressor.rewrite.kept import CorrectedThetas
from compressor.rewrite.stage import build_student
from compressor.runtime.budget import finishing_reserve_after_s
from compressor.runtime.context import JobContext
from compressor.runtime.costs import count_parameters
from compressor.runtime.memory import clustering_peak_bytes, quantizing_peak_bytes, shortfall
from compressor.runtime.outputs import (
    describe_fidelity,
    fidelity_by_output,
)
from compressor.search.candidates import (
    Candidate,
    all_dense,
    scored_as_initialized,
    within_reach,
)
from compressor.search.layer_forms import LayerForms, layer_rows
from compressor.vocabulary import ONNX_ARTIFACT, PLANNING

# Quantized candidates tried at most, each kind (each is exported and run in onnxruntime).
INT8_TRIES = 4
INT4_TRIES = 3
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
# ... and on each file when finalists are timed again in turn (`Scout.in_turn`).
IN_TURN_LATENCY_SECONDS = 1.0
# Objective latency: candidates that meet the floor at most this share slower than the fastest
# that does are timed again in turn with it before the finalists are ordered.
LATENCY_TIE = 0.1


class Scout:
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
        # the longest a candidate's export took, and an int8 candidate's held-out pass in
        # onnxruntime: what the artifact's export, verification and report are estimated from
        self.export_s = self.onnx_pass_s = 0.0
        # the longest a float candidate and an int8 candidate took, from the report that it
        # was being scored to its figures (None: none scored yet): what the float walk keeps
        # room for (`_leaves_room_for_int8`)
        self.float_s: float | None = None
        self.int8_s: float | None = None
        # how many MatMul inputs int8 smoothing divided in the last smoothed export, and in the
        # original's (None: not exported smoothed yet): none, and the original's unsmoothed
        # int8 would be the same file
        self.divided: int | None = None
        self.original_divided: int | None = None
        self._scoring_started = 0.0
        # the candidates left out because the machine lacks the memory to score them, and why
        # (`_fits`)
        self.not_scored: list[str] = []

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
        the first beyond fine-tuning's reach of the floor (`_walk_floats`; under a time
        budget, early enough to score an int8 candidate: `_leaves_room_for_int8`); then int8
        from the smallest float candidate within reach upward (int8 only loses fidelity), until
        one meets it or the tries run out; then int4 of the original; then int4 on the budgets
        the same way (`_walk_int4`); then `shared`, the shared-values candidate.

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
            if (not self._affords(candidates, f"the candidate keeping {fraction:g} with int8")
                    or not self._fits_quantizing("int8", plan, fraction)):
                break
            self._report(candidates, plans, f"scoring the candidate keeping {fraction:g} "
                                            "with int8")
            candidate = self._quantized(fraction, plan, "int8")
            if candidate is None:
                continue
            candidates.append(candidate)
            if candidate.meets_floor:
                break
        self._original_quantized(candidates, plans, dense, "int4")
        self._walk_int4(candidates, in_reach)
        if self.target.objective == "latency" and self.config.export.int8_smoothing is not None:
            self._original_unsmoothed(candidates, plans, dense)
        if (shared.compressed and self._affords(candidates, "the shared-values candidate")
                and self._fits("the shared-values candidate", clustering_peak_bytes(
                    max(4 * p.layer.numel for p in shared.compressed)))):
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
        if (not self._affords(candidates, f"the original with {quantize}")
                or not self._fits_quantizing(quantize, dense)):
            return
        self._report(candidates, plans, f"scoring the original with {quantize}")
        try:
            self._append(candidates, self._quantized(1.0, dense, quantize))
        except ExportError as exc:
            if quantize != "int4":
                raise
            self.job.log.info(f"target: int4 of the original not scored: {exc.message}")

    def _original_unsmoothed(self, candidates: list[Candidate], plans: list, dense: Plan,
                             ) -> None:
        """Objective latency: score int8 of the original unsmoothed too, appending it to
        `candidates`, if the time budget and the memory afford it: the fastest int8 of all may
        be the one without the smoothing's Mul nodes. Not when smoothing divided none of the
        original's inputs: it is then the same model (logged)."""
        if self.original_divided == 0:
            self.job.log.info("target: int8 of the original is not scored unsmoothed too: "
                              "smoothing divided none of its inputs, so it is the same model")
            return
        if (not self._affords(candidates, "the original with int8, unsmoothed")
                or not self._fits_quantizing("int8", dense)):
            return
        self._report(candidates, plans, "scoring the original with int8, unsmoothed")
        self._append(candidates, self._quantized(1.0, dense, "int8", smoothed=False))

    def _walk_floats(self, candidates: list[Candidate], plans: list[tuple[float, Plan]]) -> None:
        """Score the budgets in float, largest first, appending them to `candidates`, down to
        the first that is beyond fine-tuning's reach of the floor: a smaller budget only loses
        more, and no candidate beyond reach is ever fine-tuned (nor is its int8 or int4, which
        lose more still)."""
        for index, (fraction, plan) in enumerate(reversed(plans)):
            if not self._affords(candidates, f"the candidate keeping {fraction:g}"):
                break
            if not self._leaves_room_for_int8(candidates, fraction):
                break
            self._scoring_started = self.job.control.budget.elapsed_s()
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

    def _leaves_room_for_int8(self, candidates: list[Candidate], fraction: float) -> bool:
        """Whether the time budget affords the float candidate keeping `fraction` and then an
        int8 candidate, once int8 of the original was scored and a float candidate is within
        reach of the floor; the first time it does not, the float walk's cut is recorded, so
        that int8 of the smallest budget within reach is scored instead.

        With int8 of the original scored, a smaller float budget matters as the base of an int8
        candidate: one 4x smaller than the float candidates that keep a floor. Under
        `"max_minutes": 20`, a random-weight BERT-base's walk scored float budgets down to 0.85
        (90 s each) and stopped there, so its int8 candidates, which come after the float walk,
        were never scored, and it shipped int8 of the original."""
        if self.int8_s is None or self.float_s is None or not any(
                c.quantize is None and within_reach(c.fidelity, self.target) for c in candidates):
            return True
        longest_build = max(self.built_s.values(), default=0.0)
        needed = self.float_s + self.int8_s + longest_build
        if self.job.control.budget.affords(FINALISTS_SHARE * self.work_s + needed):
            return True
        smallest = min(c.kept_fraction for c in candidates if c.quantize is None)
        self.job.control.budget.cut(f"target search's float budgets stopped at {smallest:g}, "
                                    f"before {fraction:g}, to leave time for int8 candidates")
        self.job.log.info(f"target: the float budgets stop at {smallest:g}, before "
                          f"{fraction:g}: scoring it and then an int8 candidate (about "
                          f"{needed:.0f} s) would eat into the time kept for the finalists "
                          f"({self.job.control.budget.describe()})")
        return False

    def _walk_int4(self, candidates: list[Candidate], plans: list[tuple[float, Plan]]) -> None:
        """Score int4 candidates from the first budget int8 was scored at upward, appending
        them to `candidates`: at most `INT4_TRIES`, until one meets the floor or costs no less
        (by the objective) than the cheapest candidate that already does (a larger budget only
        costs more).

        int4 loses more than int8 at the same budget (all-MiniLM-L6-v2's original: held-out
        cosine 0.972 to int8's 0.991; the tiny test models' relative L2 0.11 to 0.016), so a
        budget whose int8 candidate is beyond fine-tuning's reach of the floor is skipped.
        int4 applies to MatMul weights and tables only: on a model with none, it is skipped.
        None is scored when int4 of the original is beyond reach: a smaller budget only loses
        more (all-MiniLM-L6-v2: int4 of the original 0.9725 against a floor of 0.99, then kept
        0.95 / 0.9 / 0.85 + int4 0.9694 / 0.9664 / 0.9650, 42 s of scoring).
        """
        original = next((c for c in candidates
                         if c.quantize == "int4" and c.kept_fraction == 1.0), None)
        if original is not None and not (original.meets_floor
                                         or within_reach(original.fidelity, self.target)):
            self.job.log.info("target: int4 is stacked on no budget: int4 of the original is "
                              "beyond fine-tuning's reach of the floor, and a smaller budget "
                              "only loses more")
            return
        int8 = {c.kept_fraction: c for c in candidates if c.quantize == "int8"}
        tried = 0
        for fraction, plan in plans:
            if tried == INT4_TRIES:
                break
            scored = int8.get(fraction)
            if scored is not None and not (scored.meets_floor
                                           or within_reach(scored.fidelity, self.target)):
                continue
            if (not self._affords(candidates, f"the candidate keeping {fraction:g} with int4")
                    or not self._fits_quantizing("int4", plan, fraction)):
                break
            tried += 1
            self._report(candidates, plans, f"scoring the candidate keeping {fraction:g} "
                                            "with int4")
            try:
                candidate = self._quantized(fraction, plan, "int4")
            except ExportError as exc:  # e.g. no MatMul weight in the compact form either
                self.job.log.info(f"target: no int4 candidates scored: {exc.message}")
                return
            if candidate is None:
                continue
            candidates.append(candidate)
            objective = self.target.objective
            cheapest = min((c.cost(objective) for c in candidates if c.meets_floor),
                           default=float("inf"))
            cost = candidate.cost(objective)
            if candidate.meets_floor or cheapest <= cost < float("inf"):
                break

    def _report(self, candidates: list[Candidate], plans: list, message: str) -> None:
        """Report the planning stage's progress while quantized candidates are scored."""
        self._scoring_started = self.job.control.budget.elapsed_s()
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

    def drop_kept_files(self, keeping: list[Candidate] | tuple = ()) -> None:
        """Remove the files kept as timed, but those of `keeping` (candidates that may ship as
        they were scored: their file is then the artifact's, `SearchResult.scored_file`)."""
        if self.kept_files is None:
            return
        kept = {c.shipped_file.parent for c in keeping if c.shipped_file is not None}
        for folder in self.kept_files.iterdir():
            if folder not in kept:
                shutil.rmtree(folder, ignore_errors=True)
        if not kept:
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
        twin (`scored_as_initialized`), or it is the original (its figures are read). Its build
        in the search is the estimate (a rebuild reuses the corrected θ: no longer), or the
        longest build for one an earlier try scored.
        On Gemma-3 270M that was 35 s the budget did not keep (int8 of the original: 1.3 s
        built, 30.5 s scored). 0 without a budget or untried."""
        budget = self.job.control.budget
        if not budget.limited or not untried:
            return 0.0
        longest = max(self.built_s.values(), default=0.0)
        return max(self.built_s.get(id(c.plan), longest)
                   + (0.0 if not c.plan.compressed  # the original: its figures are read
                      or scored_as_initialized(c, candidates, self.loaded)
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
        """Score `plan` with `quantize` stacked; None (not scored, and logged) when the latency
        objective exports every layer it compresses dense (that is the original quantized with
        low-rank weights, as large and as fast as the original quantized, and less faithful), or
        when the quantizer finds the machine short of memory for it (`_not_scored`)."""
        plan = self.exported(plan, quantize)
        if all_dense(plan):
            # int8 of the original with low-rank weights: as large, as fast, less faithful
            self.job.log.info(f"target: the candidate keeping {fraction:g} with {quantize} is "
                              f"not scored: every compressed layer is exported dense with "
                              f"{quantize}, so it is {quantize} of the original with low-rank "
                              "weights")
            return None
        self.divided = None  # set by this candidate's smoothed export, if it has one
        try:
            # the student is built here and held by nothing else: freed once it is exported
            scored, size, latency, kept = self.quantized_fidelity(self._student(plan), plan,
                                                                  quantize, smoothed, keep=True)
        except ResourceError as exc:  # its real export is larger than `_fits_quantizing` said
            self._not_scored(_quantized_name(fraction, quantize), exc.message)
            return None
        if fraction == 1.0 and quantize == "int8" and smoothed:
            self.original_divided = self.divided
        return self._logged(Candidate(fraction, quantize, self._parameters(plan), size, scored,
                                      self.target.met_by(scored), latency_ms=latency,
                                      unsmoothed=quantize == "int8" and not smoothed,
                                      plan=plan, shipped_file=kept))

    @staticmethod
    def _append(candidates: list[Candidate], candidate: Candidate | None) -> None:
        if candidate is not None:
            candidates.append(candidate)

    def _fits_quantizing(self, quantize: str, plan: Plan, fraction: float = 1.0) -> bool:
        """Whether the machine has the memory onnxruntime's `quantize` needs for the candidate
        keeping `fraction` (`plan`; its float export has 4 bytes a parameter); see `_fits`."""
        return self._fits(_quantized_name(fraction, quantize), quantizing_peak_bytes(
            quantize, 4 * self._parameters(plan), self.job.costs.largest_weight_bytes))

    def _fits(self, what: str, needed_bytes: int) -> bool:
        """Whether the machine has the `needed_bytes` of memory that scoring `what` adds to the
        job's; when it does not, `what` is left out (`_not_scored`). onnxruntime's int8
        quantizer alone adds 4.6x a model's bytes (Gemma-3 270M: 4.9 GiB over what the search
        held): on a model of a few GB, scoring it would have the kernel kill the job."""
        reason = shortfall(needed_bytes, f"scoring {what}")
        if reason is None:
            return True
        self._not_scored(what, reason)
        return False

    def _not_scored(self, what: str, reason: str) -> None:
        """Leave out `what` because of `reason` (memory), and say so."""
        self.not_scored.append(f"{what}: {reason}")
        self.job.log.info(f"target: {what} is not scored: {reason}")

    def _logged(self, candidate: Candidate) -> Candidate:
        """Log that `candidate` was scored, with the memory the search holds then (what each
        kind of candidate costs it: a language model's search peaked at 10.5 GiB, 10x its
        weights, unexplained by stage peaks alone), and return it."""
        self.job.log.info(f"target: scored {candidate.name}: "
                          f"{describe_fidelity(candidate.fidelity)}; {self.job.log.memory_now()}")
        took = self.job.control.budget.elapsed_s() - self._scoring_started
        if candidate.quantize is None and candidate.method == "lowrank":
            self.float_s = max(self.float_s or 0.0, took)
        elif candidate.quantize == "int8":
            self.int8_s = max(self.int8_s or 0.0, took)
        return candidate

    def quantized_fidelity(self, student: fx.GraphModule, plan: Plan, quantize: str,
                           smoothed: bool = True, keep: bool = False,
                           scales: dict[str, torch.Tensor] | None = None,
                           ) -> tuple[dict[str, dict[str, Any]], int, float | None, Path | None]:
        """Export `student`'s compact form, quantize it (`quantize`: "int8" or "int4"; int8
        from a smoothed copy unless `smoothed` is False, divided by `scales` when given: those
        a quantization-aware fine-tuning learned through) and score it in onnxruntime; return
        its fidelity, its bytes and, when `_timed`, its latency (else None) and, with `keep`,
        where its file is kept (`keep`; else None). The student is left as it was."""
        shipping = self._shipped(student, plan, quantize, smoothed, scales)
        del student  # held by the export until it is written (see `_exported`)
        with shipping as quantized:
            budget = self.job.control.budget
            started = budget.elapsed_s()
            scored = fidelity_by_output(onnx_fidelity(quantized, self.held_out, self.loaded.kinds,
                                                  self.loaded.next_token),
                                    self.loaded.output_names)
            if quantize == "int8":
                self.onnx_pass_s = max(self.onnx_pass_s, budget.elapsed_s() - started)
                self._expect_finishing()
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
                 smoothed: bool = True, scales: dict[str, torch.Tensor] | None = None,
                 ) -> Iterator[Path]:
        """Export `student`'s compact form as it would ship: quantized (`quantize`; int8 from
        a copy smoothed, by `scales` when given, unless `smoothed` is False) or not, into a
        scratch folder removed after."""
        exporting = self._exported(student, plan, smoothed=smoothed and quantize == "int8",
                                   scales=scales)
        del student  # held by the export until it is written (see `_exported`)
        with exporting as exported:
            if quantize is None:
                yield exported
                return
            quantized = exported.parent / quantize / ONNX_ARTIFACT
            quantized.parent.mkdir()
            QUANTIZERS[quantize](exported, quantized,
                                 largest_weight_bytes=self.job.costs.largest_weight_bytes)
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

    def _expect_finishing(self) -> None:
        """Keep what the candidates' exports and int8 held-out passes (`export_s`,
        `onnx_pass_s`) say the artifact's export, verification and report need, when that is
        more than the reserve kept so far."""
        budget = self.job.control.budget
        needed = finishing_reserve_after_s(self.export_s, self.onnx_pass_s,
                                           self.config.export.latency_seconds)
        if budget.limited and budget.reserve_at_least(needed):
            passed = (f", an int8 candidate's held-out pass in onnxruntime "
                      f"{self.onnx_pass_s:.0f} s" if self.onnx_pass_s else "")
            self.job.log.info(f"time budget: a candidate's export took {self.export_s:.0f} s"
                              f"{passed}; {needed:.0f} s are now kept for the artifact's export, "
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
    def _exported(self, student: fx.GraphModule, plan: Plan, smoothed: bool = False,
                  scales: dict[str, torch.Tensor] | None = None) -> Iterator[Path]:
        """Export `student`'s compact form (`smoothed`: as int8 will quantize it, see
        `export.int8_smoothing`; by `scales` when given, else by factors measured now) into a
        scratch folder, removed after."""
        module = materialized(student, self.loaded.teacher, plan, "factorized")
        alpha = self.config.export.int8_smoothing
        if smoothed and alpha is not None:
            module = smoothed_for_int8(module, smoothing_batches(self.loaded), alpha, scales)
            self.divided = divided_inputs(module)
        held_out = self.loaded.held_out
        sample = held_out.take(torch.arange(min(2, len(held_out))))
        scratch = Path(tempfile.mkdtemp(prefix=".target-", dir=self.workdir))
        try:
            exported = scratch / ONNX_ARTIFACT
            budget = self.job.control.budget
            started = budget.elapsed_s()
            export_onnx(module, sample, self.loaded.specs, exported, self.config.export.opset)
            self.export_s = max(self.export_s, budget.elapsed_s() - started)
            self._expect_finishing()
            # The file holds it now: a student that nothing else holds (a budget's, scored) and
            # the smoothed copy's scaled weights are freed before it is quantized and scored.
            del module, student
            gc.collect()  # GraphModules sit in reference cycles
            yield exported
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _quantized_name(fraction: float, quantize: str) -> str:
    return (f"the original with {quantize}" if fraction == 1.0
            else f"the candidate keeping {fraction:g} with {quantize}")
