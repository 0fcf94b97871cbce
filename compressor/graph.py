"""Find the compressible layers of a program's graph, record their inputs, swap in compact forms.

The program runs as the `GraphModule` that `ExportedProgram.module()` returns: its Linear,
Conv2d and Embedding layers are `aten.linear` / `aten.conv2d` / `aten.embedding` calls whose
weight is a `get_attr` of a parameter owned by a submodule named like the original layer
(`encoder.0.dense.weight`). Parametrizing that
submodule's `weight` changes what every `get_attr` reads, so the graph itself stays untouched
until the factorized export replaces each call with a compact module.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.nn import functional as F

from compressor.methods import LayerInfo, LayerStats

_LINEAR = torch.ops.aten.linear.default
_CONV2D = torch.ops.aten.conv2d.default
_EMBEDDING = torch.ops.aten.embedding.default
# Where each layer call keeps its input and its weight among its arguments.
_INPUT_ARG = {_LINEAR: 0, _CONV2D: 0, _EMBEDDING: 1}
_WEIGHT_ARG = {_LINEAR: 1, _CONV2D: 1, _EMBEDDING: 0}
# Weight-bearing calls no method rewrites: find_layers lists them as skipped, with the reason.
_UNSUPPORTED = {
    torch.ops.aten.conv1d.default: "1-D convolution (only Linear and Conv2d layers are rewritten)",
    torch.ops.aten.conv1d.padding: "1-D convolution (only Linear and Conv2d layers are rewritten)",
    torch.ops.aten.conv2d.padding: "Conv2d with padding given as a string ('same' / 'valid'); "
                                   "export it with numeric padding to compress it",
    torch.ops.aten.conv3d.default: "3-D convolution (only Linear and Conv2d layers are rewritten)",
    torch.ops.aten.conv_transpose1d.default: "transposed convolution (not supported)",
    torch.ops.aten.conv_transpose2d.input: "transposed convolution (not supported)",
    torch.ops.aten.conv_transpose3d.input: "transposed convolution (not supported)",
}
# Activation-aware init keeps an (in × in) float64 Gram per layer; past this it falls back to SVD.
MAX_GRAM_FEATURES = 8192
# All Gram matrices of one job together stay float64 up to this size, or up to this fraction of
# the model's own bytes when that is more; float32 beyond.
GRAM_FLOAT64_BYTES = 1 << 28
GRAM_FLOAT64_PER_MODEL_BYTE = 0.5
# Rows multiplied at a time when a Gram matrix is accumulated.
_ROWS_PER_CHUNK = 4096
# A float64 product aᵀb past this many multiply-adds is computed in float32 chunks.
_FLOAT64_PRODUCT_MACS = 1 << 33


def add_product_(total: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Add aᵀ b to `total` in place, `_ROWS_PER_CHUNK` rows at a time (no copy of `a` or `b`
    in `total`'s dtype is made whole).

    Each chunk is multiplied in `total`'s dtype, except that a float64 product of more than
    `_FLOAT64_PRODUCT_MACS` multiply-adds (a large model's) multiplies each chunk in float32,
    twice as fast, and sums the chunks in float64: the rounding is then that of one chunk's sum.
    """
    macs = a.shape[0] * a.shape[1] * b.shape[1]
    dtype = torch.float32 if macs > _FLOAT64_PRODUCT_MACS else total.dtype
    for start in range(0, a.shape[0], _ROWS_PER_CHUNK):
        part_a = a[start:start + _ROWS_PER_CHUNK].to(dtype)
        part_b = part_a if b is a else b[start:start + _ROWS_PER_CHUNK].to(dtype)
        total += (part_a.T @ part_b).to(total.dtype)
    return total


@dataclass(frozen=True)
class SkippedLayer:
    """A weight-bearing layer that cannot be compressed, and why."""

    name: str
    reason: str


def _as_pair(value: object, default: int) -> tuple[int, int]:
    if value is None:
        return (default, default)
    if isinstance(value, int):
        return (value, value)
    items = [int(v) for v in value]  # type: ignore[union-attr]
    return (items[0], items[0]) if len(items) == 1 else (items[0], items[1])


def _layer_nodes(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "call_function" and n.target in _INPUT_ARG]


def layer_input(node: fx.Node) -> fx.Node:
    """Return the node that feeds a layer call its input (the ids of an embedding)."""
    return node.args[_INPUT_ARG[node.target]]


def _weight_target(node: fx.Node) -> str | None:
    index = _WEIGHT_ARG[node.target]
    weight = node.args[index] if len(node.args) > index else None
    if isinstance(weight, fx.Node) and weight.op == "get_attr" and weight.target.endswith("weight"):
        return weight.target
    return None


def _owner_name(target: str) -> str | None:
    """Return the dotted name of the module whose `weight` `target` is; None otherwise."""
    owner, _, attr = target.rpartition(".")
    return owner if owner and attr == "weight" else None


def find_layers(module: fx.GraphModule) -> tuple[list[LayerInfo], list[SkippedLayer]]:
    """Return the compressible Linear / Conv2d / Embedding layers of `module`, and the others."""
    attr_uses = Counter(n.target for n in module.graph.nodes if n.op == "get_attr"
                        for _ in n.users)
    layers: list[LayerInfo] = []
    skipped: list[SkippedLayer] = []
    for node in _layer_nodes(module.graph):
        target = _weight_target(node)
        if target is None:
            skipped.append(SkippedLayer(node.name, "its weight is computed in the graph, not a parameter"))
            continue
        name = _owner_name(target)
        if name is None:
            skipped.append(SkippedLayer(target, "its weight is not a submodule's `weight`"))
            continue
        if attr_uses[target] != 1:
            skipped.append(SkippedLayer(name, "its weight is shared with other operations"))
            continue
        weight = module.get_parameter(target)
        is_output = any(user.op == "output" for user in node.users)
        if node.target is _EMBEDDING:
            layers.append(LayerInfo(name, "embedding", tuple(weight.shape), False,
                                    produces_output=is_output))
            continue
        bias = node.args[2] if len(node.args) > 2 else None
        if node.target is _LINEAR:
            layers.append(LayerInfo(name, "linear", tuple(weight.shape), bias is not None,
                                    produces_output=is_output))
            continue
        args = list(node.args) + [None] * (7 - len(node.args))
        groups = int(args[6] or 1)
        if groups != 1:
            skipped.append(SkippedLayer(name, f"grouped convolution (groups={groups})"))
            continue
        layers.append(LayerInfo(
            name, "conv2d", tuple(weight.shape), bias is not None,
            stride=_as_pair(args[3], 1), padding=_as_pair(args[4], 0),
            dilation=_as_pair(args[5], 1), groups=groups, produces_output=is_output,
        ))
    return layers, _unique(skipped + _unsupported_layers(module.graph))


def _unsupported_layers(graph: fx.Graph) -> list[SkippedLayer]:
    found = []
    for node in graph.nodes:
        if node.op == "call_function" and node.target in _UNSUPPORTED:
            weight = node.args[1] if len(node.args) > 1 else None  # (input, weight, ...)
            target = weight.target if isinstance(weight, fx.Node) and weight.op == "get_attr" else None
            name = (_owner_name(target) if target else None) or target or node.name
            found.append(SkippedLayer(name, _UNSUPPORTED[node.target]))
    return found


def _unique(skipped: list[SkippedLayer]) -> list[SkippedLayer]:
    """Return `skipped` without repeats (a layer called twice is found twice)."""
    return list(dict.fromkeys(skipped))


def layer_calls(module: fx.GraphModule) -> dict[fx.Node, str]:
    """Return each layer call of the graph with the dotted name of the module owning its weight."""
    calls = {}
    for node in _layer_nodes(module.graph):
        target = _weight_target(node)
        name = _owner_name(target) if target else None
        if name is not None:
            calls[node] = name
    return calls


def layer_rows(layer: LayerInfo, x: torch.Tensor) -> torch.Tensor:
    """Return the layer's input as rows of `in_features` (unfolded patches for a conv)."""
    if layer.kind == "conv2d":
        patches = F.unfold(x, layer.kernel_size, dilation=layer.dilation,
                           padding=layer.padding, stride=layer.stride)
        return patches.transpose(1, 2).reshape(-1, layer.in_features)
    return x.reshape(-1, layer.in_features)


class _Recorded(Exception):
    """Raised once the last recorded layer has its input: the rest of the graph is not run."""


class _InputRecorder(fx.Interpreter):
    """Run the graph up to the last target layer and hand each target layer's input to
    `record(layer, x)`. What follows (a decoder's logits, say) is never computed."""

    def __init__(self, module: fx.GraphModule, layers: dict[str, LayerInfo], record) -> None:
        super().__init__(module)
        self._by_node = {}
        for node in _layer_nodes(module.graph):
            target = _weight_target(node)
            name = _owner_name(target) if target else None
            if name in layers:
                self._by_node[node] = layers[name]
        self._last = next((n for n in reversed(module.graph.nodes) if n in self._by_node), None)
        self._record = record

    def run_node(self, n: fx.Node):
        layer = self._by_node.get(n)
        if layer is not None:
            self._record(layer, self.env[layer_input(n)].detach())
            if n is self._last:
                raise _Recorded
        return super().run_node(n)


def graph_inputs(module: fx.GraphModule, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Return `batch`'s tensors in the order of the graph's placeholders (what
    `fx.Interpreter.run` takes)."""
    return [batch[n.target] for n in module.graph.nodes if n.op == "placeholder"]


def rows_layout(layer: LayerInfo) -> tuple:
    """What decides how a layer cuts its input into rows (`layer_rows`): layers reading one
    tensor with equal layouts see equal rows, so their statistics can be shared."""
    return (layer.kind, layer.in_features, layer.kernel_size, layer.stride, layer.padding,
            layer.dilation)


def run_recording(module: fx.GraphModule, layers: list[LayerInfo],
                  batch: dict[str, torch.Tensor], record) -> None:
    """Run `module` on `batch`, calling `record(layer, input)` for each layer in `layers`."""
    recorder = _InputRecorder(module, {layer.name: layer for layer in layers}, record)
    with torch.no_grad():
        try:
            recorder.run(*graph_inputs(module, batch))
        except _Recorded:
            pass
        finally:
            recorder.env.clear()


def collect_layer_stats(module: fx.GraphModule, layers: list[LayerInfo],
                        batches: list[dict[str, torch.Tensor]],
                        on_complete: Callable[[str, LayerStats], None] | None = None,
                        ) -> dict[str, LayerStats]:
    """Return each layer's input statistics summed over `batches` (for activation-aware init):
    the Gram matrix of a Linear's or Conv2d's inputs, how often an embedding reads each row.

    Layers that read the same tensor the same way (the query, key and value projections of an
    attention block) share one Gram matrix: it is computed once and stored once. Gram matrices
    are float64 unless all of them together would pass both `GRAM_FLOAT64_BYTES` and
    `GRAM_FLOAT64_PER_MODEL_BYTE` × the model's bytes; then float32. They are summed a chunk
    of rows at a time (`add_product_`).

    With `on_complete`, each layer's statistics are handed to it as soon as they are complete
    and are not kept (nothing is returned): with a single batch that is as the layer is reached,
    so only one Gram matrix (or one group's) is alive at a time; with several, after the last.
    """
    wanted = [layer for layer in layers
              if layer.kind == "embedding" or layer.in_features <= MAX_GRAM_FEATURES]
    by_name = {layer.name: layer for layer in wanted}
    readers = _shared_inputs(module, by_name)
    grams = {key: layers_[0] for key, layers_ in readers.items()}
    streaming = on_complete is not None and len(batches) == 1
    gram_bytes = sum(8 * layer.in_features ** 2 for layer in grams.values()
                     if layer.kind != "embedding")
    if streaming:  # one group at a time
        gram_bytes = max([0] + [8 * layer.in_features ** 2 for layer in grams.values()])
    model_bytes = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    limit = max(GRAM_FLOAT64_BYTES, GRAM_FLOAT64_PER_MODEL_BYTE * model_bytes)
    dtype = torch.float64 if gram_bytes <= limit else torch.float32
    shared: dict[tuple, LayerStats] = {}
    first = {layer: key for key, layer in grams.items()}
    calls = Counter(layer_calls(module).values())
    calls_left = {key: calls.get(layer.name, 0) for key, layer in grams.items()}
    collected: dict[str, LayerStats] = {}
    complete = on_complete or collected.__setitem__

    def finish(key: tuple) -> None:
        entry = shared.pop(key, None) or _empty_stats(grams[key], dtype)
        for layer in readers[key]:
            complete(layer.name, LayerStats(entry.gram, entry.rows, entry.row_counts))

    def record(layer: LayerInfo, x: torch.Tensor) -> None:
        key = first.get(layer)
        if key is None:
            return  # another reader of the same input already counted it
        entry = shared.get(key) or shared.setdefault(key, _empty_stats(layer, dtype))
        if layer.kind == "embedding":
            ids = x.reshape(-1).to(torch.int64)
            entry.row_counts += torch.bincount(ids, minlength=layer.out_features)[
                :layer.out_features].to(torch.float64)
            entry.rows += ids.numel()
        else:
            rows = layer_rows(layer, x)
            add_product_(entry.gram, rows, rows)
            entry.rows += rows.shape[0]
        calls_left[key] -= 1
        if streaming and calls_left[key] == 0:
            finish(key)

    for batch in batches:
        run_recording(module, list(first), batch, record)
    for key in list(grams):
        if not streaming or key in shared or calls_left[key] > 0:
            finish(key)
    return collected


def _shared_inputs(module: fx.GraphModule,
                   layers: dict[str, LayerInfo]) -> dict[tuple, list[LayerInfo]]:
    """Group `layers` by what their statistics are computed from: the node feeding them and how
    they read it (kind, kernel, stride, padding, dilation). A layer called more than once, or
    not found in the graph, is a group of its own."""
    calls: dict[str, list[fx.Node]] = {}
    for node, name in layer_calls(module).items():
        calls.setdefault(name, []).append(node)
    groups: dict[tuple, list[LayerInfo]] = {}
    for name, layer in layers.items():
        nodes = calls.get(name, [])
        source = layer_input(nodes[0]).name if len(nodes) == 1 else f"layer:{name}"
        key = (source, *rows_layout(layer))
        groups.setdefault(key, []).append(layer)
    return groups


def _empty_stats(layer: LayerInfo, dtype: torch.dtype = torch.float64) -> LayerStats:
    if layer.kind == "embedding":
        return LayerStats(None, row_counts=torch.zeros(layer.out_features, dtype=torch.float64))
    return LayerStats(torch.zeros(layer.in_features, layer.in_features, dtype=dtype))


def replace_layers_(module: fx.GraphModule, compact: dict[str, nn.Module]) -> None:
    """Replace each named layer's linear/conv call with a call to its compact module, in place.

    The layer's dense weight and bias leave the module, so the export holds only θ.
    """
    for node in _layer_nodes(module.graph):
        target = _weight_target(node)
        name = _owner_name(target) if target else None
        if name not in compact:
            continue
        slot = "compact__" + name.replace(".", "__")
        module.add_submodule(slot, compact[name])
        with module.graph.inserting_before(node):
            call = module.graph.call_module(slot, (layer_input(node),))
        node.replace_all_uses_with(call)
        attrs = [a for a in node.args if isinstance(a, fx.Node) and a.op == "get_attr"]
        module.graph.erase_node(node)
        for attr in attrs:
            if not attr.users:
                module.graph.erase_node(attr)
    for name in compact:
        owner = module.get_submodule(name)
        for attr in ("weight", "bias"):
            if attr in owner._parameters:
                delattr(owner, attr)
    module.recompile()
