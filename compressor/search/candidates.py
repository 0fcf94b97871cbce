"""Target mode's candidates: what one is, which budgets exist, and whether one is within reach.

A candidate is a budget (kept fraction of the targeted weights, spread by sensitivity along the
allocation's greedy path: `budget_plans`), in float or with onnxruntime's quantization stacked on
its compact form, the original quantized (`dense_plan`: kept fraction 1), or every targeted
weight one of `SHARED_VALUES` shared values (`shared_values_plan`); with what it measured when
the search (`compressor.search.scout`) scored it as initialized.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from compressor.config import TargetConfig
from compressor.load.stage import LoadedJob
from compressor.methods import configured
from compressor.methods.share_values import ShareValuesOptions
from compressor.plan.allocation import allocate_by_sensitivity
from compressor.plan.planning import LayerPlan, Plan
from compressor.runtime.context import JobContext
from compressor.runtime.layers import LayerStats
from compressor.runtime.outputs import (
    FIGURE_LABELS,
    PERPLEXITY_RATIO,
    OutputFidelity,
    judged_figure,
)

# The kept fractions of the targeted weights the search tries (`Scout._walk_floats`: largest
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
# Candidates that miss the floor by at most this as initialized (top-1 agreement; a relative L2
# this share above its floor) are within fine-tuning's reach: smaller ones are fine-tuned first,
# before the smallest that meets the floor as initialized.
REACH = 0.01
REACH_RELATIVE_L2 = 0.5
# ... and a cosine whose distance from 1 is at most this share above the floor's: fine-tuning
# took a third of it at most (all-MiniLM-L6-v2: ratio 0.75 in float 0.978 → 0.985 after 100
# steps; kept 0.8 + int8 0.9812 → 0.9862 and kept 0.85 + int8 0.9881 → 0.9901 after 300), so
# kept 0.8 + int8, 0.0088 below a floor of 0.99 and within the 0.01 that reached it before,
# spent a third of the job's 771 s on 300 steps and missed, in every run.
REACH_COSINE = 0.5
# ... and a language model's perplexity ratio this much above its floor (100 CPU steps of 256
# tokens took Gemma-3 270M at ratio 0.8 from 1.51 to 1.43 × the original's).
REACH_PERPLEXITY_RATIO = 0.1


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
    # its ONNX file as it ships, kept from when it was timed as it was scored (`Scout.keep`)
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


def within_reach(fidelity: dict[str, dict[str, Any]], target: TargetConfig) -> bool:
    """Whether every scored output is at most its figure's reach beyond its floor."""
    for figures in fidelity.values():
        judged = judged_figure(figures)
        reach = {"relative_l2": REACH_RELATIVE_L2 * target.relative_l2,
                 "cosine": REACH_COSINE * (1 - target.cosine),
                 PERPLEXITY_RATIO: REACH_PERPLEXITY_RATIO}.get(judged[0] if judged else "", REACH)
        if target.margin(figures) < -reach:
            return False
    return True


def float_twins(candidate: Candidate, candidates: list[Candidate]) -> list[Candidate]:
    """Return the candidates that are `candidate` in float: the same method and budget,
    unquantized (`candidate` itself when it is float), in the order they were scored."""
    return [c for c in candidates if c.quantize is None and c.method == candidate.method
            and c.kept_fraction == candidate.kept_fraction]


def quantization_loss_beyond_floor(candidate: Candidate, candidates: list[Candidate],
                                   target: TargetConfig) -> str | None:
    """Say why fine-tuning in float cannot bring quantized `candidate` to the floor, or None
    when it may: what quantizing cost the judged figure of its float twin (the same budget,
    scored unquantized) already puts it beyond the floor from a perfect float model (cosine
    and top-1 agreement lose their difference from 1, relative L2 gains the quantized minus the
    float, a perplexity ratio its factor). Float fine-tuning only brings the float model nearer
    the original; the two losses add (all-MiniLM-L6-v2: int8 cost ~0.0006 cosine compressed or
    not). A random-weight BERT-base's kept 0.85 + int4 (cosine 0.9811, float 0.9974; floor
    0.99) spent 50 steps and 328 s of a 20-minute budget on a held-out loss no step lowered.
    None too when no float twin was scored."""
    twins = float_twins(candidate, candidates)
    if candidate.quantize is None or not twins:
        return None
    for name, figures in candidate.fidelity.items():
        judged, float_judged = judged_figure(figures), judged_figure(twins[0].fidelity[name])
        if judged is None or float_judged is None:
            continue
        figure, value, lower_is_better = judged
        if figure == PERPLEXITY_RATIO:
            best = value / max(float_judged[1], 1e-12)
        elif lower_is_better:
            best = max(0.0, value - float_judged[1])
        else:
            best = value + (1.0 - float_judged[1])
        floor = target.floors()[figure]
        if (best > floor) if lower_is_better else (best < floor):
            return (f"{candidate.quantize} cost its {name} {FIGURE_LABELS[figure]} "
                    f"{float_judged[1]:.4f} -> {value:.4f}: from a perfect float model that "
                    f"would still be {best:.4f}, beyond the floor {floor:g}, and fine-tuning "
                    f"in float cannot take back what {candidate.quantize} costs")
    return None


def scored_as_initialized(candidate: Candidate, candidates: list[Candidate],
                           loaded: LoadedJob) -> tuple[list[OutputFidelity], float] | None:
    """Return the fidelity and held-out score of `candidate`'s student as initialized, as the
    search scored it in PyTorch: its own (float), or its float twin's (the same budget's plan,
    unquantized: the same student); None when neither was scored so."""
    twins = [c for c in float_twins(candidate, candidates) if c.held_out_score is not None]
    if not twins:
        return None
    figures = twins[0].fidelity
    return ([OutputFidelity(**figures[name]) for name in loaded.output_names],
            twins[0].held_out_score)


def budget_plans(plan: Plan, prepared: dict, sensitivities: dict[str, float],
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


def latency_costs(plan: Plan, stats: dict[str, LayerStats], job: JobContext,
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


def all_dense(plan: Plan) -> bool:
    """Whether every layer `plan` compresses is exported dense (`Plan.dense_exports`)."""
    return bool(plan.compressed) and all(p.layer.name in plan.dense_exports
                                         for p in plan.compressed)


def dense_plan(plan: Plan) -> Plan:
    """Return `plan` with every layer left dense (the original's weights as they are)."""
    layers = tuple(replace(p, size=None, compact_numel=float(p.layer.numel),
                           reason="kept dense: the original, quantized") for p in plan.layers)
    return replace(plan, layers=layers, budget=float(plan.targeted_numel), layer_ratio=1.0)
