"""The two forms a trained student is exported in: plain dense weights, or the compact form.

`materialize`: the original graph with W = f(θ) computed once per layer, a drop-in replacement.
`factorize`: each compressed layer's call replaced by its method's compact module (two matmuls,
a Gather over a codebook, ...), which holds θ only. Both share the student's tensors.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx, nn

from compressor.plan.layers import (
    layer_input,
    layer_nodes,
    owner_name,
    tied_embedding_call,
    weight_target,
)
from compressor.plan.planning import LayerPlan, Plan
from compressor.rewrite.parametrize import parametrization_of, theta_of
from compressor.runtime.graph import shallow_copy

# The submodule a compressed layer's compact module is registered under: this + its dotted name
# with "." as "__".
COMPACT_PREFIX = "compact__"


def _set_tensor(module: nn.Module, dotted: str, tensor: torch.Tensor) -> None:
    prefix, _, name = dotted.rpartition(".")
    owner = module.get_submodule(prefix)
    if name in owner._parameters:
        owner._parameters[name] = (tensor if isinstance(tensor, nn.Parameter)
                                   else nn.Parameter(tensor, requires_grad=False))
    else:
        owner._buffers[name] = tensor


def own_copies_(module: nn.Module, storages: set[int]) -> int:
    """Give `module` its own copy of each tensor whose storage (`untyped_storage().data_ptr()`)
    is in `storages`, in place, one name or many (a tied table's) for one copy; return the bytes
    copied.

    A checkpoint's weights are read from one memory-mapped file: the file stays mapped, every
    page read still resident, while any of them is alive. The compact form shares only the
    original's small tensors (norms, biases, layers left dense), so copying those releases the
    whole file once the original is dropped.
    """
    copies: dict[int, torch.Tensor] = {}
    copied = 0
    named = [*module.named_parameters(remove_duplicate=False),
             *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if tensor.untyped_storage().data_ptr() not in storages:
            continue
        if id(tensor) not in copies:
            copy = tensor.detach().clone()
            copies[id(tensor)] = (nn.Parameter(copy, requires_grad=False)
                                  if isinstance(tensor, nn.Parameter) else copy)
            copied += tensor.numel() * tensor.element_size()
        _set_tensor(module, name, copies[id(tensor)])
    return copied


def _with_student_state(student: nn.Module, base: fx.GraphModule) -> fx.GraphModule:
    """Return a shallow copy of the unparametrized `base` holding every plain tensor of
    `student` (shared, not copied).

    Copies start from `base`, never from the parametrized student: a deep copy of a parametrized
    module shares torch's injected class with it, and un-parametrizing one would break the other.
    """
    clone = shallow_copy(base)
    state = student.state_dict(keep_vars=True)
    for name, tensor in clone.state_dict(keep_vars=True).items():
        if name in state and state[name] is not tensor:
            _set_tensor(clone, name, state[name].detach())
    return clone


def release_theta_(student: nn.Module, name: str) -> None:
    """Free the θ storage of layer `name` of `student` (which cannot compute that layer after)."""
    for theta in theta_of(student, name):
        theta.data = torch.empty(0, dtype=theta.dtype, device=theta.device)


def materialize(student: nn.Module, base: fx.GraphModule, plan: Plan,
                consume: bool = False) -> fx.GraphModule:
    """Return the student as a plain dense model: the original graph, W = f(θ) computed once.

    With `consume`, each layer's θ is freed as soon as its W exists, so the dense weights never
    sit beside all of θ (the student cannot run afterwards).
    """
    dense = _with_student_state(student, base)
    _set_weights_(dense, student, plan.compressed, _aliases(base), consume)
    return dense


def _set_weights_(module: nn.Module, student: nn.Module, entries: Iterable[LayerPlan],
                  aliases: dict[str, tuple[str, ...]], consume: bool = False) -> None:
    """Give `module` each entry's W = f(θ) as the student computes it, under every name the
    weight goes by (a tied table's too); with `consume`, free each layer's θ once its W exists."""
    with torch.no_grad():
        for entry in entries:
            weight = student.get_submodule(entry.layer.name).weight.detach()
            name = f"{entry.layer.name}.weight"
            for alias in aliases.get(name, (name,)):
                _set_tensor(module, alias, weight)
            if consume:
                release_theta_(student, entry.layer.name)


def _aliases(module: nn.Module) -> dict[str, tuple[str, ...]]:
    """Return, for each parameter name, every name the same tensor goes by (a tied LM head and
    its input table: `lm_head.weight` is `wte.weight`)."""
    names: dict[int, list[str]] = {}
    for name, tensor in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(tensor), []).append(name)
    return {name: tuple(group) for group in names.values() for name in group}


def factorize(student: nn.Module, base: fx.GraphModule, plan: Plan) -> fx.GraphModule:
    """Return the student with its compressed layers in compact form (θ only, no dense W), but
    those the plan exports dense (`Plan.dense_exports`: measured faster so), whose W is made
    once as `materialize` makes it."""
    compact = {}
    dense = [entry for entry in plan.compressed if entry.layer.name in plan.dense_exports]
    for entry in plan.compressed:
        if entry.layer.name in plan.dense_exports:
            continue
        owner = student.get_submodule(entry.layer.name)
        bias = getattr(owner, "bias", None)
        theta = tuple(t.detach() for t in theta_of(student, entry.layer.name))
        compact[entry.layer.name] = entry.method.compact_module(
            entry.layer, parametrization_of(student, entry.layer.name), theta,
            None if bias is None else bias.detach())
    clone = _with_student_state(student, base)
    _set_weights_(clone, student, dense, _aliases(base))
    replace_layers_(clone, compact)
    return clone


def replace_layers_(module: fx.GraphModule, compact: dict[str, nn.Module]) -> None:
    """Replace each named layer's linear/conv call with a call to its compact module, in place.

    A tied head's embedding call gets the module its compact module gives for its rows
    (`tied_embedding`), reading the same θ. The layer's dense weight and bias leave the module,
    under every name the weight goes by (a tied table's too), so that neither the export nor
    the memory holds more than θ.
    """
    aliases = _aliases(module)
    for node in layer_nodes(module.graph):
        target = weight_target(node)
        name = owner_name(target) if target else None
        if name not in compact:
            continue
        slot = COMPACT_PREFIX + name.replace(".", "__")
        if tied_embedding_call(node):
            slot, layer_module = slot + "__rows", compact[name].tied_embedding()
        else:
            layer_module = compact[name]
        module.add_submodule(slot, layer_module)
        with module.graph.inserting_before(node):
            call = module.graph.call_module(slot, (layer_input(node),))
        node.replace_all_uses_with(call)
        attrs = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        module.graph.erase_node(node)
        for attr in attrs:
            if not attr.users:
                module.graph.erase_node(attr)
    for node in list(module.graph.nodes):  # a weight two replaced calls read
        if node.op == "get_attr" and not node.users:
            module.graph.erase_node(node)
    read = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name in compact:
        owner = module.get_submodule(name)
        for attr in ("weight", "bias"):
            if attr in owner._parameters:
                delattr(owner, attr)
        for alias in aliases.get(f"{name}.weight", ()):  # the input table a tied head reads
            prefix, _, attr = alias.rpartition(".")
            holder = module.get_submodule(prefix)
            if alias not in read and attr in holder._parameters:
                delattr(holder, attr)
    module.recompile()
