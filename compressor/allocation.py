"""Spread the low-rank budget across layers by measured sensitivity instead of one ratio for all.

Each lowrank layer's full decomposition says what every rank costs in squared output error on
the calibration inputs (`LowRankFactors.error`). How much that error matters to the model's
outputs differs by layer, so it is measured: each layer alone is truncated to its uniform-plan
rank in the original model, and the distillation loss this causes on a calibration batch,
divided by the layer's own squared error at that rank, is its sensitivity. The predicted loss
of a plan is the sum over layers of sensitivity × error(rank). Ranks are then bought greedily,
RANK_MULTIPLE at a time (so they stay multiples of 8), always where they remove the most
predicted loss per stored number, within the budget the uniform plan spent on these layers.
Buying past a layer's break-even rank leaves it dense.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, replace

import torch
from torch import fx

from compressor.methods.lowrank import RANK_MULTIPLE, LowRankFactors
from compressor.objectives import distillation_loss
from compressor.outputs import run_outputs
from compressor.planning import LayerPlan, Plan


@dataclass(frozen=True)
class _Option:
    """The next purchase for one layer: go from `rank` to `next_rank` (None: dense)."""

    layer: int
    next_rank: int | None
    cost: float
    gain: float


def measure_sensitivities(teacher: fx.GraphModule, plan: Plan,
                          factors: dict[str, LowRankFactors], batch: dict[str, torch.Tensor],
                          kinds: list[str]) -> dict[str, float]:
    """Return each factored layer's loss per unit of squared output error (see module docstring).

    Each layer's weight is swapped for its truncation at the planned rank and restored; the
    teacher is unchanged afterwards.
    """
    sensitivities: dict[str, float] = {}
    with torch.no_grad():
        reference = run_outputs(teacher, batch)
        for entry in plan.compressed:
            layer_factors = factors.get(entry.layer.name)
            if layer_factors is None:
                continue
            error = layer_factors.error(entry.size)
            if error <= 0:
                sensitivities[entry.layer.name] = 0.0
                continue
            weight = teacher.get_submodule(entry.layer.name).weight
            saved = weight.detach().clone()
            truncated = layer_factors.product(entry.size)
            weight.copy_(truncated.reshape(weight.shape).to(weight.dtype))
            try:
                loss = float(distillation_loss(run_outputs(teacher, batch), reference, kinds))
            finally:
                weight.copy_(saved)
            sensitivities[entry.layer.name] = loss / error
    return sensitivities


def _options(index: int, entry: LayerPlan, rank: int, cap: int, factors: LowRankFactors,
             sensitivity: float) -> _Option | None:
    width = entry.layer.out_features + entry.layer.in_features
    if rank < cap:
        next_rank = min(rank + RANK_MULTIPLE, cap)
        gain = sensitivity * (factors.error(rank) - factors.error(next_rank))
        return _Option(index, next_rank, float((next_rank - rank) * width), gain)
    if rank == cap:  # the last step: keep the dense weight
        return _Option(index, None, float(entry.layer.numel - cap * width),
                       sensitivity * factors.error(cap))
    return None


def allocate_by_sensitivity(plan: Plan, factors: dict[str, LowRankFactors],
                            sensitivities: dict[str, float], break_even: dict[str, int]) -> Plan:
    """Return `plan` with the ranks of its adjustable lowrank layers re-spread by sensitivity.

    The reallocated layers share exactly the numbers the uniform plan gave them; other layers
    (overrides, other methods) keep their plan. Each layer keeps at least RANK_MULTIPLE ranks.
    """
    chosen = [i for i, p in enumerate(plan.layers)
              if p.adjustable and p.method.name == "lowrank" and p.layer.name in sensitivities]
    if not chosen:
        return plan
    budget = sum(plan.layers[i].compact_numel for i in chosen)
    ranks: dict[int, int | None] = {}
    spent = 0.0
    for i in chosen:
        entry = plan.layers[i]
        ranks[i] = min(RANK_MULTIPLE, break_even[entry.layer.name])
        spent += ranks[i] * (entry.layer.out_features + entry.layer.in_features)
    if spent > budget:
        return plan  # too tight to give every layer a minimum: the uniform plan stands
    heap: list[tuple[float, int, _Option]] = []

    def push(i: int) -> None:
        entry = plan.layers[i]
        name = entry.layer.name
        option = _options(i, entry, ranks[i], break_even[name], factors[name], sensitivities[name])
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
                      float(rank * (entry.layer.out_features + entry.layer.in_features)))
        layers[i] = replace(entry, size=rank, compact_numel=size_numel,
                            sensitivity=sensitivities[entry.layer.name],
                            reason="" if rank is not None else
                            "kept dense: its sensitivity is worth its full size")
    return replace(plan, layers=tuple(layers), allocation="sensitivity")
