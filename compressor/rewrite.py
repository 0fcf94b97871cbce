"""Register each planned layer's parametrization, so its weight is computed from θ."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from compressor.graph import replace_layers_
from compressor.methods import GradReduction, LayerStats
from compressor.planning import Plan


def parametrize_(module: fx.GraphModule, plan: Plan, stats: dict[str, LayerStats],
                 grad_reduction: GradReduction = "sum") -> None:
    """Rewrite every compressed layer of `plan` in `module` to W = f(θ), θ initialized from W.

    `stats` holds the calibration statistics of the layers whose method uses them;
    `grad_reduction` is how tied θ entries reduce their copies' gradients (sum or mean).
    Every parameter of `module` is frozen afterwards except θ (see `trainable_parameters`).
    """
    for param in module.parameters():
        param.requires_grad_(False)
    for entry in plan.compressed:
        owner = module.get_submodule(entry.layer.name)
        weight = owner.weight.detach()
        parametrization = entry.method.parametrization(
            entry.layer, weight, entry.size, stats.get(entry.layer.name), grad_reduction)
        parametrize.register_parametrization(owner, "weight", parametrization)
        for theta in owner.parametrizations.weight.parameters():
            theta.requires_grad_(True)


def theta_of(module: nn.Module, name: str) -> tuple[torch.Tensor, ...]:
    """Return the θ tensors of the parametrized layer `name`, in right_inverse order."""
    plist = module.get_submodule(name).parametrizations.weight
    count = sum(1 for key in plist._parameters if key.startswith("original"))
    if count == 1 and "original" in plist._parameters:
        return (plist.original,)
    return tuple(getattr(plist, f"original{i}") for i in range(count))


def trainable_parameters(module: nn.Module, plan: Plan, train_biases: bool) -> list[nn.Parameter]:
    """Return θ of every compressed layer (plus their biases when `train_biases`), and make
    exactly these the parameters of `module` that require a gradient."""
    for param in module.parameters():
        param.requires_grad_(False)
    params: list[nn.Parameter] = []
    for entry in plan.compressed:
        owner = module.get_submodule(entry.layer.name)
        params.extend(owner.parametrizations.weight.parameters())
        if train_biases and getattr(owner, "bias", None) is not None:
            params.append(owner.bias)
    for param in params:
        param.requires_grad_(True)
    return params


def _with_student_state(student: nn.Module, base: fx.GraphModule) -> fx.GraphModule:
    """Return a copy of the unparametrized `base` holding every plain tensor of `student`.

    Copies start from `base`, never from the parametrized student: a deep copy of a parametrized
    module shares torch's injected class with it, and un-parametrizing one would break the other.
    """
    clone = copy.deepcopy(base)
    state = student.state_dict()
    with torch.no_grad():
        for name, tensor in clone.state_dict(keep_vars=True).items():
            if name in state:
                tensor.copy_(state[name])
    return clone


def materialize(student: nn.Module, base: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Return the student as a plain dense model: the original graph, W = f(θ) computed once."""
    dense = _with_student_state(student, base)
    with torch.no_grad():
        for entry in plan.compressed:
            weight = dense.get_submodule(entry.layer.name).weight
            weight.copy_(student.get_submodule(entry.layer.name).weight)
    return dense


def factorize(student: nn.Module, base: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Return the student with its compressed layers in compact form (θ only, no dense W)."""
    compact = {}
    for entry in plan.compressed:
        owner = student.get_submodule(entry.layer.name)
        bias = getattr(owner, "bias", None)
        theta = tuple(t.detach() for t in theta_of(student, entry.layer.name))
        compact[entry.layer.name] = entry.method.compact_module(
            entry.layer, owner.parametrizations.weight[0], theta,
            None if bias is None else bias.detach())
    clone = _with_student_state(student, base)
    replace_layers_(clone, compact)
    return clone
