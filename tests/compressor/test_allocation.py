"""Sensitivity allocation: ranks spread by measured sensitivity within the uniform plan's budget."""

import copy

import pytest
import torch

from compressor.config import CompressionConfig
from compressor.methods import get_method
from compressor.methods.lowrank import RANK_MULTIPLE
from compressor.plan.allocation import allocate_by_sensitivity, measure_sensitivities
from compressor.plan.layers import find_layers
from compressor.plan.planning import plan_layers
from compressor.runtime.objectives import distillation_loss
from compressor.runtime.outputs import run_outputs
from tests.support.tiny_models import MODEL_CLASSES, example_inputs, make_pt2

LOWRANK = get_method("lowrank")


def _setup(tmp_path, ratio=0.5):
    program = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2")))
    teacher = program.module()
    config = CompressionConfig.parse({"ratio": ratio, "min_layer_params": 0,
                                      "allocation": "uniform"})
    plan = plan_layers(*find_layers(teacher), config)
    factors = {p.layer.name: LOWRANK.factorize(p.layer, teacher.get_submodule(p.layer.name)
                                               .weight.detach(), None)
               for p in plan.compressed}
    batch = example_inputs(MODEL_CLASSES["text"](), batch=16, seed=3)
    kinds = ["logits", "embedding"]
    return teacher, plan, factors, batch, kinds


def _predicted_loss(plan, factors, sensitivities):
    return sum(sensitivities[p.layer.name] * (factors[p.layer.name].error(p.size)
                                              if p.compressed else 0.0)
               for p in plan.layers if p.layer.name in sensitivities)


def test_sensitivity_is_the_loss_one_truncated_layer_causes_per_unit_of_its_error(tmp_path):
    teacher, plan, factors, batch, kinds = _setup(tmp_path)
    before = copy.deepcopy(teacher.state_dict())
    sensitivities = measure_sensitivities(teacher, plan, factors, batch, kinds)
    # The teacher is left as it was.
    for name, tensor in teacher.state_dict().items():
        torch.testing.assert_close(tensor, before[name], rtol=0, atol=0)
    entry = plan.compressed[1]
    weight = teacher.get_submodule(entry.layer.name).weight
    layer_factors = factors[entry.layer.name]
    with torch.no_grad():
        reference = run_outputs(teacher, batch)
        weight.copy_(layer_factors.first(entry.size) @ layer_factors.second(entry.size))
        loss = float(distillation_loss(run_outputs(teacher, batch), reference, kinds))
        weight.copy_(before[f"{entry.layer.name}.weight"])
    assert sensitivities[entry.layer.name] == pytest.approx(
        loss / layer_factors.error(entry.size), rel=1e-5)


def test_allocation_keeps_the_budget_uses_multiples_of_8_and_predicts_a_lower_loss(tmp_path):
    teacher, plan, factors, batch, kinds = _setup(tmp_path, ratio=0.5)
    sensitivities = measure_sensitivities(teacher, plan, factors, batch, kinds)
    break_even = {p.layer.name: LOWRANK.break_even_size(p.layer) for p in plan.layers}
    allocated = allocate_by_sensitivity(plan, factors, sensitivities)
    assert allocated.allocation == "sensitivity"
    spent = sum(p.compact_numel for p in allocated.layers if p.adjustable)
    assert spent <= sum(p.compact_numel for p in plan.layers if p.adjustable)
    for entry in allocated.layers:
        if entry.compressed:
            assert entry.size % RANK_MULTIPLE == 0 or entry.size == break_even[entry.layer.name]
        else:
            assert "sensitivity" in entry.reason
    assert (_predicted_loss(allocated, factors, sensitivities)
            < _predicted_loss(plan, factors, sensitivities))


def test_layers_sized_by_an_override_keep_their_size(tmp_path):
    program = torch.export.load(str(make_pt2("text", tmp_path / "text.pt2")))
    teacher = program.module()
    config = CompressionConfig.parse({"ratio": 0.5, "min_layer_params": 0,
                                      "overrides": [{"match": "mlp_in", "rank": 3}]})
    plan = plan_layers(*find_layers(teacher), config)
    factors = {p.layer.name: LOWRANK.factorize(p.layer, teacher.get_submodule(p.layer.name)
                                               .weight.detach(), None) for p in plan.compressed}
    batch = example_inputs(MODEL_CLASSES["text"](), batch=8)
    sensitivities = measure_sensitivities(teacher, plan, factors, batch, ["logits", "embedding"])
    allocated = allocate_by_sensitivity(plan, factors, sensitivities)
    assert {p.layer.name: p.size for p in allocated.layers}["mlp_in"] == 3


def test_break_even_rank_is_the_last_rank_that_saves_numbers():
    from compressor.methods import LayerInfo

    info = LayerInfo("l", "linear", (100, 10), False)
    rank = LOWRANK.break_even_size(info)
    assert rank * 110 < 1000 <= (rank + 1) * 110


def test_with_costs_a_layer_whose_numbers_cost_more_to_run_is_cut_more(tmp_path):
    # Target mode's latency objective prices a number by the multiply-adds it does a sample:
    # the same budget share then cuts the layer that runs on more rows (a conv at a high
    # resolution) deeper, and the budget is kept in those units.
    teacher, plan, factors, _, _ = _setup(tmp_path, ratio=0.5)
    sensitivities = {p.layer.name: 1.0 for p in plan.compressed}
    adjustable = [p for p in plan.layers if p.adjustable and p.layer.name in factors]

    def sizes(costs):
        budget = 0.5 * sum(costs[p.layer.name] * p.layer.numel for p in adjustable)
        allocated = allocate_by_sensitivity(plan, factors, sensitivities, budget, costs)
        spent = sum(costs[p.layer.name] * p.compact_numel
                    for p in allocated.layers if p.layer.name in costs)
        assert allocated.allocation == "sensitivity" and spent <= budget
        return {p.layer.name: p.size or LOWRANK.break_even_size(p.layer) + 1
                for p in allocated.layers}

    alike = sizes({p.layer.name: 1.0 for p in adjustable})
    costly = max(alike, key=alike.get)  # the layer that kept the most
    assert alike[costly] > RANK_MULTIPLE
    priced = sizes({p.layer.name: 8.0 if p.layer.name == costly else 1.0 for p in adjustable})
    assert priced[costly] < alike[costly]
    assert all(priced[name] >= alike[name] for name in alike if name != costly)
    # numbers priced alike by any constant spread exactly as without costs
    assert sizes({p.layer.name: 3.0 for p in adjustable}) == alike == {
        p.layer.name: p.size or LOWRANK.break_even_size(p.layer) + 1
        for p in allocate_by_sensitivity(plan, factors, sensitivities,
                                         0.5 * sum(p.layer.numel for p in adjustable)).layers}
