"""Run a program's graph one node at a time: the one stepper every stage that looks inside uses.

The pipeline runs the `GraphModule` that `ExportedProgram.module()` returns. Calibration records
each layer's input, the sensitivity probe hooks each layer's output gradient, the sequential
correction runs the original and the compressed model side by side, and activation
checkpointing runs a block at a time: each walks the graph with a `GraphStepper`, which keeps a
value only until its last use, as the generated code does. A weight read (`get_attr`) goes
through the module, so a parametrized weight computes W = f(θ) where it is read.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator

import torch
from torch import fx, nn
from torch.utils._pytree import tree_flatten


def graph_inputs(module: fx.GraphModule, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Return `batch`'s tensors in the order of the graph's placeholders (what
    `fx.Interpreter.run` takes)."""
    return [batch[n.target] for n in module.graph.nodes if n.op == "placeholder"]


def last_uses(graph: fx.Graph, stop_before: fx.Node | None = None,
              ) -> dict[fx.Node, list[fx.Node]]:
    """Return, for each node, the nodes whose last use it is (they may be freed after it).
    With `stop_before`, nothing after that node runs: a use after it is none (a value read
    there, such as a tied table read again by the head, is freed after its last use up to it).
    The stop's own inputs are kept: they are read there (the last corrected layer's input)."""
    last: dict[fx.Node, fx.Node] = {}
    for node in graph.nodes:
        for used in node.all_input_nodes:
            last[used] = node
        if node is stop_before:
            break
    freed: dict[fx.Node, list[fx.Node]] = {}
    for used, user in last.items():
        freed.setdefault(user, []).append(used)
    return freed


def run_node(module: fx.GraphModule, node: fx.Node, env: dict[fx.Node, object]) -> object:
    """Return the value of one computing node, its inputs read from `env`."""
    args = fx.node.map_arg(node.args, env.__getitem__)
    kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
    if node.op == "get_attr":
        value = module
        for name in node.target.split("."):
            value = getattr(value, name)  # a parametrized weight computes W = f(θ) here
        return value
    if node.op == "call_function":
        return node.target(*args, **kwargs)
    if node.op == "call_method":
        return getattr(args[0], node.target)(*args[1:], **kwargs)
    if node.op == "call_module":
        return module.get_submodule(node.target)(*args, **kwargs)
    raise ValueError(f"cannot run graph node {node.format_node()}")


class GraphStepper:
    """Run a GraphModule one node at a time, freeing each value after its last use.

    `env` starts with the batch's inputs (or the values given); `step(node)` computes one node
    (reading any weight it needs that was not read yet) and drops the values whose last use it
    was, except those in `keep`. `freed` may give the graph's `last_uses`, computed once.
    """

    def __init__(self, module: fx.GraphModule, batch: dict[str, torch.Tensor] | None = None,
                 *, env: dict[fx.Node, object] | None = None,
                 keep: Iterable[fx.Node] = (),
                 freed: dict[fx.Node, list[fx.Node]] | None = None) -> None:
        self.module = module
        self.env: dict[fx.Node, object] = {} if env is None else env
        if batch is not None:
            self.env.update({n: batch[n.target] for n in module.graph.nodes
                             if n.op == "placeholder"})
        self.keep = frozenset(keep)
        self._freed = last_uses(module.graph) if freed is None else freed

    def nodes(self) -> Iterator[fx.Node]:
        """Yield the graph's nodes in order, up to (not including) its output."""
        for node in self.module.graph.nodes:
            if node.op == "output":
                return
            yield node

    def steps_through(self, wanted: Iterable[fx.Node]) -> Iterator[fx.Node]:
        """Step the graph node by node, yielding each node once computed, and stop after the
        last of `wanted`: what follows (a language model's vocabulary-wide head, most of its
        forward pass) is never computed."""
        remaining = set(wanted)
        for node in self.nodes():
            if not remaining:
                return
            self.step(node)
            remaining.discard(node)
            yield node

    def value(self, node: fx.Node) -> object:
        """Return the value of a node computed (or given) so far."""
        return self.env[node]

    def step(self, node: fx.Node) -> None:
        """Compute `node` (an input is given: nothing to compute), then free what no later node
        reads."""
        if node.op == "placeholder":
            return
        env = self.env
        for used in node.all_input_nodes:  # weights not read yet are read now
            if used.op == "get_attr" and used not in env:
                env[used] = run_node(self.module, used, env)
        env[node] = run_node(self.module, node, env)
        for done in self._freed.get(node, []):
            if done not in self.keep:
                env.pop(done, None)

    def outputs(self) -> list[torch.Tensor]:
        """Return the graph's outputs (every node before them computed), flattened to tensors."""
        output = next(n for n in self.module.graph.nodes if n.op == "output")
        leaves, _ = tree_flatten(fx.node.map_arg(output.args[0], self.env.__getitem__))
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    def clear(self) -> None:
        """Drop every value held (autograd hooks on them can keep cycles alive)."""
        self.env.clear()


def live_bytes(module: fx.GraphModule, batch: dict[str, torch.Tensor],
               stop_before: fx.Node | None = None) -> tuple[int, int]:
    """Run `module` on `batch` one node at a time, freeing each value after its last use; return
    the most bytes of intermediate tensors alive at once (weights not counted) and the bytes of
    its outputs. With `stop_before`, only the nodes before that one run (no outputs: 0)."""
    stepper = GraphStepper(module, batch, freed=last_uses(module.graph, stop_before))
    weights = {t.untyped_storage().data_ptr() for t in (*module.parameters(), *module.buffers())}

    def held(values) -> int:
        storages = {v.untyped_storage().data_ptr(): v.untyped_storage().nbytes()
                    for v in values if isinstance(v, torch.Tensor)}
        return sum(size for ptr, size in storages.items() if ptr not in weights)

    peak = 0
    with torch.no_grad():
        for node in module.graph.nodes:
            if node is stop_before:
                return peak, 0
            if node.op == "output":
                return peak, held(stepper.value(n) for n in node.all_input_nodes)
            stepper.step(node)
            peak = max(peak, held(stepper.env.values()))
    return peak, 0


def shallow_copy(module: nn.Module) -> nn.Module:
    """Return a copy of `module`'s structure (submodules, graph) sharing its parameters and
    buffers: nothing is copied that holds weights."""
    shared: dict[int, object] = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, shared)
