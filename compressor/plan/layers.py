"""Find the compressible layers of a program's graph, and the weight-bearing ones that are not.

The program runs as the `GraphModule` that `ExportedProgram.module()` returns: its layers are
calls of a registered kind's op (`compressor.runtime.layers`: `aten.linear`, `aten.addmm`,
`aten.conv1d`, `aten.conv2d`, `aten.embedding`) whose weight is a `get_attr` of a parameter
owned by a submodule named like the original layer (`encoder.0.dense.weight`). Parametrizing
that submodule's `weight` changes what every `get_attr` reads, so the graph itself stays
untouched until the factorized export replaces each call with a compact module.

Nothing weight-bearing goes unmentioned: every parameter of two or more dimensions (a matrix,
a kernel, a table) that the graph reads is a layer's weight or listed as skipped with the
reason. Vectors (biases, norm scales) are not weights any method rewrites: they stay as they
are, with their layer.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

from compressor.runtime.graph import GraphStepper
from compressor.runtime.layers import KIND_OF_OP, REWRITTEN_LAYERS, UNSUPPORTED_OPS, LayerInfo

# Ops that only give their input another shape: a layer's result behind them is still its result.
_RESHAPES = frozenset({torch.ops.aten.view.default, torch.ops.aten.reshape.default,
                       torch.ops.aten._unsafe_view.default})


@dataclass(frozen=True)
class SkippedLayer:
    """A weight-bearing layer that cannot be compressed, and why."""

    name: str
    reason: str


def layer_nodes(graph: fx.Graph) -> list[fx.Node]:
    """Return the graph's calls of a layer kind's op, in order."""
    return [n for n in graph.nodes if n.op == "call_function" and n.target in KIND_OF_OP]


def layer_input(node: fx.Node) -> fx.Node:
    """Return the node that feeds a layer call its input (the ids of an embedding)."""
    return node.args[KIND_OF_OP[node.target].input_arg]


def weight_target(node: fx.Node) -> str | None:
    """Return the dotted name of the parameter a layer call reads as its weight; None when
    its weight is computed in the graph."""
    index = KIND_OF_OP[node.target].weight_arg
    weight = node.args[index] if len(node.args) > index else None
    if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith("weight"):
        return weight.target
    return None


def owner_name(target: str) -> str | None:
    """Return the dotted name of the module whose `weight` `target` is; None otherwise."""
    owner, _, attr = target.rpartition(".")
    return owner if owner and attr == "weight" else None


def tied_embedding_call(node: fx.Node) -> bool:
    """Whether `node` is the input-embedding use of a weight a linear layer also reads (an LM's
    head tied to its input table): that weight is one layer, the linear one, and this call
    reads it as its tied embedding."""
    if node.target not in KIND_OF_OP or KIND_OF_OP[node.target].name != "embedding":
        return False
    weight = node.args[KIND_OF_OP[node.target].weight_arg]
    if not isinstance(weight, fx.Node) or weight.op != "get_attr" or len(weight.users) != 2:
        return False
    kinds = sorted(KIND_OF_OP[u.target].name if u.target in KIND_OF_OP else "" for u in weight.users)
    return kinds == ["embedding", "linear"]


def find_layers(module: fx.GraphModule) -> tuple[list[LayerInfo], list[SkippedLayer]]:
    """Return the compressible layers of `module` (every registered kind), and the others."""
    attr_uses = Counter(n.target for n in module.graph.nodes if n.op == "get_attr"
                        for _ in n.users)
    tied = {weight_target(n) for n in layer_nodes(module.graph) if tied_embedding_call(n)}
    layers: list[LayerInfo] = []
    skipped: list[SkippedLayer] = []
    for node in layer_nodes(module.graph):
        if tied_embedding_call(node):
            continue  # its weight is the linear head's, found as that layer
        target = weight_target(node)
        if target is None:
            skipped.append(SkippedLayer(node.name, "its weight is computed in the graph, not a parameter"))
            continue
        name = owner_name(target)
        if name is None:
            skipped.append(SkippedLayer(target, "its weight is not a submodule's `weight`"))
            continue
        if attr_uses[target] != 1 and target not in tied:
            skipped.append(SkippedLayer(name, "its weight is shared with other operations"))
            continue
        kind = KIND_OF_OP[node.target]
        facts = kind.describe(node)
        if isinstance(facts, str):
            skipped.append(SkippedLayer(name, facts))
            continue
        weight = kind.weight_of(module.get_parameter(target))
        layers.append(LayerInfo(name, kind.name, tuple(weight.shape),
                                produces_output=_produces_output(node),
                                tied_embedding=target in tied, **facts))
    skipped = _unique(skipped + _unsupported_layers(module.graph))
    return layers, skipped + _unlisted_weights(module, layers, skipped)


def _produces_output(node: fx.Node) -> bool:
    """Whether the node's result is one of the model's outputs, as is or only reshaped (GPT-2's
    Conv1D gives its rows back the input's shape)."""
    return any(user.op == "output" or (user.target in _RESHAPES and _produces_output(user))
               for user in node.users)


def _unsupported_layers(graph: fx.Graph) -> list[SkippedLayer]:
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in UNSUPPORTED_OPS:
            weight = node.args[1] if len(node.args) > 1 else None  # (input, weight, ...)
            target = weight.target if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
            name = (owner_name(target) if target else None) or target or node.name
            found.append(SkippedLayer(name, UNSUPPORTED_OPS[node.target]))
    return found


def _unlisted_weights(module: fx.GraphModule, layers: list[LayerInfo],
                      skipped: list[SkippedLayer]) -> list[SkippedLayer]:
    """Return, as skipped, each parameter of two or more dimensions the graph reads that is
    neither a layer's weight nor already listed (under its module's name or its own)."""
    listed = {layer.name for layer in layers} | {entry.name for entry in skipped}
    parameters = dict(module.named_parameters(remove_duplicate=False))
    found = []
    for node in module.graph.nodes:
        parameter = parameters.get(node.target) if node.op == "get_attr" else None
        if parameter is None or parameter.dim() < 2 or not node.users:
            continue
        name = owner_name(node.target) or node.target
        if name in listed or node.target in listed:
            continue
        ops = ", ".join(sorted({_op_name(user) for user in node.users}))
        found.append(SkippedLayer(name, f"its {tuple(parameter.shape)} parameter is read by "
                                        f"{ops}, not as a layer's weight (only {REWRITTEN_LAYERS}"
                                        " reading a submodule's `weight` are rewritten)"))
        listed.add(name)
    return found


def _op_name(node: fx.Node) -> str:
    """Return a node's op as a user reads it: `aten.mm`, `output`."""
    if node.op != "call_function":
        return node.op
    name = str(node.target)  # e.g. "aten.mm.default"
    return name.removesuffix(".default")


def _unique(skipped: list[SkippedLayer]) -> list[SkippedLayer]:
    """Return `skipped` without repeats (a layer called twice is found twice)."""
    return list(dict.fromkeys(skipped))


def layer_calls(module: fx.GraphModule) -> dict[fx.Node, str]:
    """Return each layer call of the graph with the dotted name of the module owning its weight
    (a tied head's embedding call is not its layer's call: its input is token ids)."""
    calls = {}
    for node in layer_nodes(module.graph):
        if tied_embedding_call(node):
            continue
        target = weight_target(node)
        name = owner_name(target) if target else None
        if name is not None:
            calls[node] = name
    return calls


def run_recording(module: fx.GraphModule, layers: list[LayerInfo],
                  batch: dict[str, torch.Tensor], record) -> None:
    """Run `module` on `batch`, calling `record(layer, input)` for each call of a layer in
    `layers`. The graph runs only up to the last such call: what follows (a decoder's logits,
    say) is never computed."""
    by_name = {layer.name: layer for layer in layers}
    by_node = {node: by_name[name] for node, name in layer_calls(module).items()
               if name in by_name}
    last = next((n for n in reversed(module.graph.nodes) if n in by_node), None)
    stepper = GraphStepper(module, batch)
    with torch.no_grad():
        try:
            for node in stepper.nodes():
                layer = by_node.get(node)
                if layer is not None:
                    record(layer, stepper.value(layer_input(node)).detach())
                    if node is last:
                        return
                stepper.step(node)
        finally:
            stepper.clear()
