"""Find the compressible layers of a program's graph, and the weight-bearing ones that are not.

The program runs as the `GraphModule` that `ExportedProgram.module()` returns: its layers are
calls of a registered kind's op (`compressor.runtime.layers`: `aten.linear`, `aten.conv2d`,
`aten.embedding`) whose weight is a `get_attr` of a parameter owned by a submodule named like
the original layer (`encoder.0.dense.weight`). Parametrizing that submodule's `weight` changes
what every `get_attr` reads, so the graph itself stays untouched until the factorized export
replaces each call with a compact module.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import fx

from compressor.runtime.graph import GraphStepper
from compressor.runtime.layers import KIND_OF_OP, UNSUPPORTED_OPS, LayerInfo


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


def find_layers(module: fx.GraphModule) -> tuple[list[LayerInfo], list[SkippedLayer]]:
    """Return the compressible layers of `module` (every registered kind), and the others."""
    attr_uses = Counter(n.target for n in module.graph.nodes if n.op == "get_attr"
                        for _ in n.users)
    layers: list[LayerInfo] = []
    skipped: list[SkippedLayer] = []
    for node in layer_nodes(module.graph):
        target = weight_target(node)
        if target is None:
            skipped.append(SkippedLayer(node.name, "its weight is computed in the graph, not a parameter"))
            continue
        name = owner_name(target)
        if name is None:
            skipped.append(SkippedLayer(target, "its weight is not a submodule's `weight`"))
            continue
        if attr_uses[target] != 1:
            skipped.append(SkippedLayer(name, "its weight is shared with other operations"))
            continue
        kind = KIND_OF_OP[node.target]
        facts = kind.describe(node)
        if isinstance(facts, str):
            skipped.append(SkippedLayer(name, facts))
            continue
        weight = module.get_parameter(target)
        is_output = any(user.op == "output" for user in node.users)
        layers.append(LayerInfo(name, kind.name, tuple(weight.shape), produces_output=is_output,
                                **facts))
    return layers, _unique(skipped + _unsupported_layers(module.graph))


def _unsupported_layers(graph: fx.Graph) -> list[SkippedLayer]:
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in UNSUPPORTED_OPS:
            weight = node.args[1] if len(node.args) > 1 else None  # (input, weight, ...)
            target = weight.target if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
            name = (owner_name(target) if target else None) or target or node.name
            found.append(SkippedLayer(name, UNSUPPORTED_OPS[node.target]))
    return found


def _unique(skipped: list[SkippedLayer]) -> list[SkippedLayer]:
    """Return `skipped` without repeats (a layer called twice is found twice)."""
    return list(dict.fromkeys(skipped))


def layer_calls(module: fx.GraphModule) -> dict[fx.Node, str]:
    """Return each layer call of the graph with the dotted name of the module owning its weight."""
    calls = {}
    for node in layer_nodes(module.graph):
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
