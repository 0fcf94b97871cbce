"""Spread the budget across layers by sensitivity instead of one ratio for all.

A layer whose method prepared an `Approximation` during calibration (lowrank's decomposition)
has a price for every size: its squared output error on the calibration inputs. How much that
error matters to the model's outputs is the layer's sensitivity (`compressor.plan.sensitivity`),
so the predicted loss of a plan is the sum over layers of sensitivity × error(size). Sizes are
then bought greedily, the method's `size_step` at a time (lowrank's ranks stay multiples of 8),
always where they remove the most predicted loss per stored number, within the budget the
uniform plan spent on these layers. Buying past a layer's break-even size leaves it dense.
Target mode's latency objective prices a number by what it costs to run instead (`costs`: the
multiply-adds one number of a layer's θ does per sample).
"""

from __future__ import annotations

import hashlib
import heapq
import json
from dataclasses import dataclass, replace

import torch
from torch import fx

from compressor.load.data import Dataset
from compressor.methods import Approximation
from compressor.plan.planning import LayerPlan, Plan
from compressor.plan.sensitivity import (
    estimate_sensitivities,
    measure_sensitivities,
    probe_bytes_per_sample,
)
from compressor.runtime.context import JobContext
from compressor.runtime.layers import LayerStats
from compressor.runtime.resume import KeptRecord

# Sensitivities are measured (or predicted) on up to this many calibration samples.
SENSITIVITY_SAMPLES = 32
# Measuring each layer's sensitivity (a forward pass per layer) is done up to this many FLOPs;
# past it the sensitivities are predicted in one pass (about 2 minutes on 2 cores).
PROBE_FLOPS = 10**13
# The prediction keeps every probed layer's input for the backward pass: it runs as many
# samples at a time as fit in this fraction of the model's bytes (at least one), ...
ESTIMATE_BYTES_PER_MODEL_BYTE = 0.3
# ... and as many batches as these FLOPs afford (forward and backward), up to
# `SENSITIVITY_SAMPLES` samples: one sample is not a measurement (at least one sample).
ESTIMATE_FLOPS = 5 * 10**12


@dataclass(frozen=True)
class _Option:
    """The next purchase for one layer: go from its size to `next_rank` (None: dense)."""

    layer: int
    next_rank: int | None
    cost: float
    gain: float


def allocate(teacher: fx.GraphModule, plan: Plan, stats: dict[str, LayerStats],
             train: Dataset, kinds: list[str], job: JobContext) -> Plan:
    """Return `plan` with its prepared layers' sizes spread by sensitivity, within the budget
    the uniform plan spent on them."""
    prepared, sensitivities = sensitivities_of(teacher, plan, stats, train, kinds, job)
    if not prepared:
        return plan
    return allocate_by_sensitivity(plan, prepared, sensitivities)


def sensitivities_of(teacher: fx.GraphModule, plan: Plan, stats: dict[str, LayerStats],
                     train: Dataset, kinds: list[str], job: JobContext,
                     ) -> tuple[dict[str, Approximation], dict[str, float]]:
    """Return each layer's prepared approximation and its sensitivity at its planned size.

    Each layer's sensitivity is measured (one forward pass per layer) while that costs at most
    `PROBE_FLOPS`; past it (a large model) it is predicted from one forward and backward pass
    on as many samples as `ESTIMATE_BYTES_PER_MODEL_BYTE` of memory allows.
    """
    prepared = {name: s.prepared for name, s in stats.items() if s.prepared is not None}
    if not prepared:
        return prepared, {}
    one = train.take(torch.arange(1))
    samples = min(len(train), SENSITIVITY_SAMPLES)
    probe_flops = len(prepared) * samples * job.costs.flops_per_sample
    measured = probe_flops <= PROBE_FLOPS
    batch_size = samples
    if not measured:
        # A forward and a backward pass cost about three forward passes.
        samples = max(1, min(samples, ESTIMATE_FLOPS // max(1, 3 * job.costs.flops_per_sample)))
        memory = ESTIMATE_BYTES_PER_MODEL_BYTE * job.costs.model_bytes
        batch_size = max(1, min(samples,
                                int(memory // probe_bytes_per_sample(teacher, plan, one))))
    passes = -(-samples // batch_size)
    how = (f"measured: {len(prepared)} probes of {samples} samples" if measured else
           f"predicted from {passes} backward pass{'es' if passes > 1 else ''} on {samples} "
           f"samples ({batch_size} at a time; probing each layer would cost "
           f"{probe_flops / 1e12:.0f} TFLOP)")
    kept = None if job.resume is None else _kept_sensitivities(plan, prepared, how, job)
    sensitivities = None if kept is None else kept.load()
    if sensitivities is not None:
        job.log.info(f"sensitivities reused from an earlier try ({how})")
        job.reused("sensitivities")
        return prepared, sensitivities
    if measured:
        sensitivities = measure_sensitivities(teacher, plan, prepared,
                                              train.take(torch.arange(samples)), kinds)
    else:
        batches = [train.take(part) for part in torch.arange(samples).split(batch_size)]
        sensitivities = estimate_sensitivities(teacher, plan, prepared, batches, kinds)
    job.log.info(f"sensitivities {how}")
    if kept is not None:
        kept.save(sensitivities)
    return prepared, sensitivities


def _kept_sensitivities(plan: Plan, prepared: dict[str, Approximation], how: str,
                        job: JobContext) -> KeptRecord:
    """Return where the sensitivities of `plan`'s layers are kept for a retry: keyed by the
    plan, how they are found, and each layer's error at its planned size (which tells apart
    decompositions made from other calibration samples or batches)."""
    errors = {p.layer.name: repr(prepared[p.layer.name].error(p.size))
              for p in plan.compressed if p.layer.name in prepared}
    described = json.dumps({"plan": plan.to_dict(), "errors": errors}, sort_keys=True,
                           default=str)
    slot = hashlib.sha256(described.encode()).hexdigest()[:16]
    return KeptRecord(job.resume, f"sensitivities-{slot}", (described, how), "sensitivities",
                      job.log.info)


def _options(index: int, entry: LayerPlan, size: int, cap: int, prepared: Approximation,
             sensitivity: float, number_cost: float) -> _Option | None:
    method, layer = entry.method, entry.layer
    if size < cap:
        next_size = min(size + method.size_step, cap)
        gain = sensitivity * (prepared.error(size) - prepared.error(next_size))
        cost = method.compact_numel(layer, next_size) - method.compact_numel(layer, size)
        return _Option(index, next_size, number_cost * float(cost), gain)
    if size == cap:  # the last step: keep the dense weight
        return _Option(index, None,
                       number_cost * float(layer.numel - method.compact_numel(layer, cap)),
                       sensitivity * prepared.error(cap))
    return None


def allocate_by_sensitivity(plan: Plan, prepared: dict[str, Approximation],
                            sensitivities: dict[str, float], budget: float | None = None,
                            costs: dict[str, float] | None = None) -> Plan:
    """Return `plan` with the sizes of its adjustable prepared layers re-spread by sensitivity.

    The reallocated layers share `budget` numbers, by default exactly the numbers the uniform
    plan gave them; other layers (overrides, methods that prepare nothing) keep their plan.
    With `costs` (by layer name: what one number of the layer's θ costs, e.g. the
    multiply-adds it does per sample), sizes are bought per unit of cost instead of per number
    and `budget` is in those units (no default then). Each layer keeps at least one
    `size_step` of its method; a budget too small for that leaves `plan` as it was.
    """
    chosen = [i for i, p in enumerate(plan.layers)
              if p.adjustable and p.layer.name in prepared and p.layer.name in sensitivities]
    break_even = {plan.layers[i].layer.name: plan.layers[i].method.break_even_size(
        plan.layers[i].layer) for i in chosen}
    if not chosen:
        return plan
    number_cost = {plan.layers[i].layer.name: 1.0 if costs is None
                   else costs[plan.layers[i].layer.name] for i in chosen}
    if budget is None:
        if costs is not None:
            raise ValueError("a budget in units of `costs` must be given with them")
        budget = sum(plan.layers[i].compact_numel for i in chosen)
    ranks: dict[int, int | None] = {}
    spent = 0.0
    for i in chosen:
        entry = plan.layers[i]
        ranks[i] = min(entry.method.size_step, break_even[entry.layer.name])
        spent += (number_cost[entry.layer.name]
                  * entry.method.compact_numel(entry.layer, ranks[i]))
    if spent > budget:
        return plan  # too tight to give every layer a minimum: the uniform plan stands
    heap: list[tuple[float, int, _Option]] = []

    def push(i: int) -> None:
        entry = plan.layers[i]
        name = entry.layer.name
        option = _options(i, entry, ranks[i], break_even[name], prepared[name],
                          sensitivities[name], number_cost[name])
        if option is not None and option.cost > 0:
            heapq.heappush(heap, (-option.gain / option.cost, i, option))

    for i in chosen:
        push(i)
    while heap:
        _, i, option = heapq.heappop(heap)
        if spent + option.cost > budget:
            continue
        spent += option.cost
        ranks[i] = option.next_rank
        if option.next_rank is not None:
            push(i)
    layers = list(plan.layers)
    for i in chosen:
        entry = layers[i]
        rank = ranks[i]
        size_numel = (float(entry.layer.numel) if rank is None else
                      entry.method.compact_numel(entry.layer, rank))
        layers[i] = replace(entry, size=rank, compact_numel=size_numel,
                            sensitivity=sensitivities[entry.layer.name],
                            reason="" if rank is not None else
                            "kept dense: its sensitivity is worth its full size")
    return replace(plan, layers=tuple(layers), allocation="sensitivity")
