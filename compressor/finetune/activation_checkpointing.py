"""Activation checkpointing for fine-tuning: keep a block's input, recompute its activations.

A training step keeps, for the backward pass, every activation of every layer: for a
billion-parameter decoder at batch 32 × 256 tokens that is tens of GiB, far more than the
weights. `BlockCheckpointing` runs the model's graph a segment at a time and runs each
repeated block (`layers.0`, `layers.1`, ... from the graph's module paths) under
`torch.utils.checkpoint`: the step keeps each block's inputs only, and the backward pass runs
the block again. A parametrized weight W = f(θ) is read inside its block, so it is recomputed
with it, not kept.

`saved_activation_bytes` measures what a step keeps without it, on one sample, which is how
`finetune.activation_checkpointing: auto` decides (`wanted`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint

from compressor.runtime.graph import GraphStepper, last_uses

# `auto` checkpoints when a step's kept activations, plus θ's gradients and AdamW's two
# moments, would take more than this share of the memory still free on the device.
_FREE_SHARE = 0.5


@dataclass
class Segment:
    """A run of graph nodes in one block ("" outside every block), with the values it reads
    from earlier nodes and the values later nodes (or the graph's output) read from it."""

    block: str
    nodes: list[fx.Node]
    inputs: list[fx.Node]
    outputs: list[fx.Node]


def block_of(path: str) -> str:
    """Return the block a module path lies in: its prefix up to the first index
    ('model.layers.3.mlp.up_proj' -> 'model.layers.3'), or '' outside every block."""
    parts = path.split(".")
    for index, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:index + 1])
    return ""


def _node_blocks(graph: fx.Graph) -> dict[fx.Node, str]:
    """Return the block of every computing node. A weight read (`get_attr`) belongs where it is
    first used; a node without a module path stays with the node before it."""
    order = {node: index for index, node in enumerate(graph.nodes)}
    blocks: dict[fx.Node, str] = {}
    previous = ""
    for node in graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "get_attr":
            continue  # placed below, from its first user
        stack = node.meta.get("nn_module_stack")
        previous = block_of(list(stack.values())[-1][0]) if stack else previous
        blocks[node] = previous
    for node in graph.nodes:
        if node.op == "get_attr":
            users = [user for user in node.users if user in blocks]
            blocks[node] = blocks[min(users, key=order.__getitem__)] if users else ""
    return blocks


def segments(graph: fx.Graph) -> list[Segment]:
    """Split `graph`'s computing nodes into maximal runs of one block, in graph order."""
    blocks = _node_blocks(graph)
    runs: list[Segment] = []
    for node in graph.nodes:
        if node not in blocks:
            continue
        if not runs or runs[-1].block != blocks[node]:
            runs.append(Segment(blocks[node], [], [], []))
        runs[-1].nodes.append(node)
    owner = {node: run for run in runs for node in run.nodes}
    for run in runs:
        inside = set(run.nodes)
        run.inputs = list(dict.fromkeys(
            source for node in run.nodes for source in node.all_input_nodes
            if source not in inside))
        run.outputs = [node for node in run.nodes
                       if any(owner.get(user) is not run for user in node.users)]
    return runs


class BlockCheckpointing:
    """Run an fx graph module on a batch of named inputs, with its blocks checkpointed.

    Called like `run_outputs`: a dict of inputs in, the outputs' tensors out, flattened. Values
    are dropped from the running environment after their last use, as the generated code does.
    """

    def __init__(self, module: fx.GraphModule) -> None:
        self.module = module
        self.segments = segments(module.graph)
        self.blocks = sorted({s.block for s in self.segments if s.block})
        nodes = list(module.graph.nodes)
        self._placeholders = [n for n in nodes if n.op == "placeholder"]
        self._output = next(n for n in nodes if n.op == "output")
        self._freed = last_uses(module.graph)
        self._last_use = {}
        for index, node in enumerate(nodes):
            for source in node.all_input_nodes:
                self._last_use[source] = index
        self._index = {node: index for index, node in enumerate(nodes)}

    def __call__(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        env: dict[fx.Node, object] = {node: batch[node.target] for node in self._placeholders}
        for segment in self.segments:
            if segment.block:
                values = checkpoint(self._run_segment, segment, *(env[n] for n in segment.inputs),
                                    use_reentrant=False)
                env.update(zip(segment.outputs, values, strict=True))
            else:
                self._run_nodes(segment.nodes, env)
            self._forget(env, self._index[segment.nodes[-1]])
        outputs = fx.node.map_arg(self._output.args[0], env.__getitem__)
        leaves, _ = tree_flatten(outputs)
        return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]

    def _run_segment(self, segment: Segment, *inputs: object) -> tuple[object, ...]:
        env = dict(zip(segment.inputs, inputs, strict=True))
        self._run_nodes(segment.nodes, env, keep=set(segment.outputs))
        return tuple(env[node] for node in segment.outputs)

    def _run_nodes(self, nodes: list[fx.Node], env: dict[fx.Node, object],
                   keep: set[fx.Node] = frozenset()) -> None:
        stepper = GraphStepper(self.module, env=env, keep=keep, freed=self._freed)
        for node in nodes:
            stepper.step(node)

    def _forget(self, env: dict[fx.Node, object], position: int) -> None:
        for node in [n for n in env if self._last_use.get(n, -1) <= position]:
            del env[node]


def saved_activation_bytes(forward, batch: dict[str, torch.Tensor],
                           module: torch.nn.Module) -> int:
    """Return the bytes autograd would keep for the backward pass of `forward(batch)` (a
    callable like `run_outputs`), not counting `module`'s own parameters and buffers (shared
    storage is counted once).

    Nothing is kept while measuring: each saved tensor is replaced by a placeholder (the pass is
    never backpropagated), so the probe itself holds no more than an inference pass. Holding
    them would cost what it measures, every W = f(θ) included: about 10 GB on a 1.1B decoder."""
    resident = {t.untyped_storage().data_ptr()
                for t in (*module.parameters(), *module.buffers())}
    seen: dict[int, StorageWeakRef] = {}
    total = 0

    def pack(tensor: torch.Tensor) -> None:
        nonlocal total
        storage = tensor.untyped_storage()
        pointer = storage.data_ptr()
        known = seen.get(pointer)
        if pointer not in resident and (known is None or known.expired()):
            seen[pointer] = StorageWeakRef(storage)  # a freed storage's address may come back
            total += storage.nbytes()

    def unpack(_: None) -> torch.Tensor:
        raise RuntimeError("saved_activation_bytes measures a forward pass; do not backpropagate")

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        outputs = forward(batch)
    del outputs
    return total


def wanted(activation_bytes_per_step: int, theta_bytes: int, free_bytes: int | None) -> bool:
    """Whether a step needs checkpointing: its activations, θ's gradients and AdamW's two
    moments would take more than half the memory still free (`free_bytes`, None: unknown)."""
    if free_bytes is None:
        return False
    return activation_bytes_per_step + 3 * theta_bytes > _FREE_SHARE * free_bytes
