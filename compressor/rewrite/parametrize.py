"""Register each planned layer's parametrization, so its weight is computed from θ.

Memory: the student is a `shallow_copy` of the original, sharing every tensor it does not change
(θ and the compressed layers' biases are its own), and the export forms (`forms`) share the
student's tensors in turn, so a billion-parameter model is never held twice.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn
from torch.nn.utils import parametrize

from compressor.methods import GradReduction, LayerStats
from compressor.plan.planning import Plan
from compressor.runtime.layers import layer_weight, method_parametrization


def parametrize_(module: fx.GraphModule, plan: Plan, stats: dict[str, LayerStats],
                 grad_reduction: GradReduction = "sum",
                 progress: Callable[[int, int, str], None] | None = None) -> None:
    """Rewrite every compressed layer of `plan` in `module` to W = f(θ), θ initialized from W.

    `stats` holds the calibration statistics of the layers whose method uses them (each entry
    is removed as its layer is initialized, so its memory goes as θ comes);
    `grad_reduction` is how tied θ entries reduce their copies' gradients (sum or mean);
    `progress(done, total, layer name)` is called after each layer.
    Every parameter of `module` is frozen afterwards except θ (see `trainable_parameters`).
    """
    for param in module.parameters():
        param.requires_grad_(False)
    for index, entry in enumerate(plan.compressed):
        owner = module.get_submodule(entry.layer.name)
        weight = layer_weight(module, entry.layer).detach()
        if getattr(owner, "bias", None) is not None:  # its own: fine-tuning may train it
            owner.bias = nn.Parameter(owner.bias.detach().clone(), requires_grad=False)
        parametrization = entry.method.parametrization(
            entry.layer, weight, entry.size, stats.pop(entry.layer.name, None), grad_reduction)
        parametrize.register_parametrization(
            owner, "weight", entry.layer.spec.stored_parametrization(parametrization))
        for theta in owner.parametrizations.weight.parameters():
            theta.requires_grad_(True)
        if progress is not None:
            progress(index + 1, len(plan.compressed), entry.layer.name)
    sink_weight_reads_(module)


def sink_weight_reads_(module: fx.GraphModule) -> None:
    """Move every `get_attr` node of the graph to just before its first use, in place.

    An exported program reads all its weights at the top of its graph. For a parametrized
    weight a read computes W = f(θ), so the whole dense model would be made at the start of
    every forward pass and held until each W's last use: read where it is used, each W lives
    for its own layer only.
    """
    order = {node: index for index, node in enumerate(module.graph.nodes)}
    for node in list(module.graph.nodes):
        if node.op == "get_attr" and node.users:
            first = min(node.users, key=order.__getitem__)
            first.prepend(node)
    module.graph.lint()
    module.recompile()


def parametrization_of(module: nn.Module, name: str) -> nn.Module:
    """Return the method's parametrization of W that the layer `name` is rewritten with."""
    return method_parametrization(module.get_submodule(name).parametrizations.weight[0])


def theta_of(module: nn.Module, name: str) -> tuple[torch.Tensor, ...]:
    """Return the θ tensors of the parametrized layer `name`, in right_inverse order."""
    plist = module.get_submodule(name).parametrizations.weight
    count = sum(1 for key in plist._parameters if key.startswith("original"))
    if count == 1 and "original" in plist._parameters:
        return (plist.original,)
    return tuple(getattr(plist, f"original{i}") for i in range(count))


def compressed_theta(module: nn.Module, plan: Plan,
                     with_biases: bool = False) -> list[nn.Parameter]:
    """Return θ of every compressed layer of `module`, in plan order (each layer's bias after
    its θ, when `with_biases`)."""
    params: list[nn.Parameter] = []
    for entry in plan.compressed:
        owner = module.get_submodule(entry.layer.name)
        params.extend(owner.parametrizations.weight.parameters())
        if with_biases and getattr(owner, "bias", None) is not None:
            params.append(owner.bias)
    return params


def trainable_parameters(module: nn.Module, plan: Plan, train_biases: bool) -> list[nn.Parameter]:
    """Return θ of every compressed layer (plus their biases when `train_biases`), and make
    exactly these the parameters of `module` that require a gradient."""
    for param in module.parameters():
        param.requires_grad_(False)
    params = compressed_theta(module, plan, with_biases=train_biases)
    for param in params:
        param.requires_grad_(True)
    return params


