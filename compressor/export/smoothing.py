"""Activation smoothing before int8 (SmoothQuant): move the inputs' outlier channels into the weights.

onnxruntime's dynamic int8 quantizes each MatMul's input with one scale for the whole tensor
(DynamicQuantizeLinear). A transformer's activations have a few channels far larger than the
rest, so one scale leaves the others a handful of levels: on MiniLM that costs 0.007 cosine,
ten times what the int8 weights cost. Dividing each input channel j by s_j and multiplying the
weight's column j by the same s_j computes the same product in float and narrows the input's
range (SmoothQuant, Xiao et al. 2023). SmoothQuant's s_j = max|x_j|^α / max|W_:,j|^(1-α) made
MiniLM's int8 worse here (0.9925 → 0.9890 cosine at α 0.5: onnxruntime scales each weight
*row*, and the weight term grows whole columns), so only the outliers are divided:
s_j = (max|x_j| / the median channel's)^α, max|x_j| measured on calibration samples (0.9975 at
α 0.5).

Each division is a Mul node over the whole activation, which onnxruntime runs as a pass of its
own: a compressed MiniLM's 26 took 9.5 ms of its 135 ms batch of 32. So an input is smoothed
only where that cuts its MatMuls' int8 error (simulated as onnxruntime computes it, on
calibration samples) to at most `WORTH_SMOOTHING` of the unsmoothed error. On MiniLM's 25
inputs that leaves out 9: the attention outputs' (their error cut only to 0.73-0.89 of itself)
and the last three blocks' GELU outputs' (0.71-0.88), whose smoothing, left out one input at a
time, had bought the int8 model's cosine 0.0000-0.0001 each; the 9 include three of the six
1,536-wide inputs, whose Muls cost the most. It keeps Q/K/V's and the feed-forward blocks'
first inputs (0.35-0.67: 0.0000-0.0005 each) and the first three GELU outputs (0.50-0.53:
0.0006-0.0014; `benchmarks.bench_smoothing --leave-one-out`). On Gemma-3 270M it leaves out
3 of 72 (0.74-0.77).

The smoothed copy of a model divides each such input once (a Mul node on the activation, shared
by every MatMul that reads it) and holds the scaled weights as new tensors; everything else is
shared with the model it was made from. It is what gets quantized: the float artifact stays the
unsmoothed model onnxruntime was verified against, and the int8 one is still checked against it.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx, nn

from compressor.finetune.quantization_aware import fake_int8_symmetric, fake_uint8_asymmetric
from compressor.runtime.graph import GraphStepper, shallow_copy

# Smoothing factors are kept within [1 / this, this].
_MOST_SCALE = 1e2
# A channel's measured range counts as at least this share of the input's largest.
_QUIET_CHANNEL = 0.01
_LINEAR = torch.ops.aten.linear.default
# An input is smoothed when that cuts its MatMuls' simulated int8 error to at most this share.
WORTH_SMOOTHING = 0.7
# The int8 errors are measured on the first calibration batches' first this many rows of each
# input (every batch's when they hold fewer), in chunks of `_CHUNK_ROWS`.
_ERROR_ROWS = 2048
_CHUNK_ROWS = 256


@dataclass
class _Use:
    """One MatMul that reads an activation: a Linear node's weight, or a compact module whose
    first step is a Linear on its input (`int8_input_weight` names that weight)."""

    node: fx.Node
    owner: nn.Module  # the module holding the weight
    name: str  # the weight's attribute on `owner`

    @property
    def weight(self) -> torch.Tensor:
        return getattr(self.owner, self.name)

    def qualified_name(self, module_names: dict[int, str]) -> str:
        """Return the weight's name in the module whose `_module_names` are `module_names`."""
        return ".".join(filter(None, (module_names[id(self.owner)], self.name)))

    def scale_(self, scale: torch.Tensor) -> None:
        """Replace the weight (out, in) by one with column j multiplied by scale[j]."""
        scaled = (self.weight.detach() * scale.to(self.weight.dtype)).contiguous()
        setattr(self.owner, self.name, nn.Parameter(scaled, requires_grad=False))


def smoothed_for_int8(module: fx.GraphModule, batches: Iterable[dict[str, torch.Tensor]],
                      alpha: float, scales: dict[str, torch.Tensor] | None = None,
                      ) -> fx.GraphModule:
    """Return a copy of `module` with every quantizable MatMul input smoothed (see the module),
    its factors measured on `batches`; `module` is left as it was. Given `scales` (by weight
    name, as `input_scales` returns them: what a quantization-aware fine-tuning simulated), the
    inputs they name are divided by them, and no other, whatever `module` now measures."""
    clone = shallow_copy(module)
    factors = _factors(clone, batches, alpha) if scales is None else _given(clone, scales)
    if not factors:
        return clone
    order = {node: index for index, node in enumerate(clone.graph.nodes)}
    for index, (source, (readers, scale, dtype)) in enumerate(factors.items()):
        for use in readers:
            use.scale_(scale)
        name = f"int8_smoothing_{index}"
        clone.register_buffer(name, (1.0 / scale).to(dtype))
        first = min(readers, key=lambda use: order[use.node]).node
        with clone.graph.inserting_before(first):
            divisor = clone.graph.get_attr(name)
            smoothed = clone.graph.call_function(torch.ops.aten.mul.Tensor, (source, divisor))
        for use in readers:
            use.node.replace_input_with(source, smoothed)
    clone.graph.lint()
    clone.recompile()
    return clone


def divided_inputs(module: fx.GraphModule) -> int:
    """Return how many activations `module` (made by `smoothed_for_int8`) divides."""
    return sum(node.op == "get_attr" and node.target.startswith("int8_smoothing_")
               for node in module.graph.nodes)


def input_scales(module: fx.GraphModule, batches: Iterable[dict[str, torch.Tensor]],
                 alpha: float) -> dict[str, torch.Tensor]:
    """Return the factors `smoothed_for_int8(module, batches, alpha)` divides each smoothed
    MatMul's input by, keyed by the qualified name of the MatMul's weight in `module` (which is
    left as it is): what quantization-aware fine-tuning simulates the smoothed int8 with."""
    names = _module_names(module)
    return {use.qualified_name(names): scale
            for readers, scale, _ in _factors(module, batches, alpha).values()
            for use in readers}


def _module_names(module: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in module.named_modules()}


def _given(module: fx.GraphModule, scales: dict[str, torch.Tensor],
           ) -> dict[fx.Node, tuple[list[_Use], torch.Tensor, torch.dtype]]:
    """Return `_factors`' answer for the inputs whose MatMuls' weights `scales` names (an input
    is divided once, by the factors of the first of its MatMuls)."""
    names = _module_names(module)
    factors = {}
    for source, readers in _uses_by_input(module).items():
        given = [scales.get(use.qualified_name(names)) for use in readers]
        if all(scale is not None for scale in given):
            factors[source] = (readers, given[0], readers[0].weight.dtype)
    return factors


def _factors(module: fx.GraphModule, batches: Iterable[dict[str, torch.Tensor]], alpha: float,
             ) -> dict[fx.Node, tuple[list[_Use], torch.Tensor, torch.dtype]]:
    """Return, for each activation to smooth in `module`, the MatMuls that read it, the factors
    s its channels are divided by (measured on `batches`), and its dtype; {} when there is
    nothing to smooth or nothing to measure it on."""
    uses = _uses_by_input(module)
    batches = list(batches)
    if not uses or not batches:
        return {}
    ranges, dtypes = _input_ranges(module, uses.keys(), batches)
    scales = {source: _scale(ranges[source], alpha) for source in uses}
    errors = _int8_errors(module, uses, scales, batches)
    return {source: (readers, scales[source], dtypes[source])
            for source, readers in uses.items()
            if errors[source][1] <= WORTH_SMOOTHING * errors[source][0]}


def _uses_by_input(module: fx.GraphModule) -> dict[fx.Node, list[_Use]]:
    """Return, for each activation a smoothable MatMul reads, the MatMuls that read it.

    A weight read anywhere else too (a shared layer, a tied table) is left alone, and so is
    every MatMul of an activation one of whose readers is: its scaled copy would be wrong there.
    """
    reads: dict[tuple[int, str], int] = {}
    found = []
    for node in module.graph.nodes:
        if node.op == "get_attr":
            prefix, _, name = node.target.rpartition(".")
            key = (id(module.get_submodule(prefix)), name)
            reads[key] = reads.get(key, 0) + len(node.users)
        use = _use(module, node)
        if use is not None:
            found.append(use)
        if node.op == "call_module":
            key = (id(module.get_submodule(node.target)), "")
            reads[key] = reads.get(key, 0) + 1
    # a tensor two modules hold (a tied head's factors, read by its embedding too)
    holders = Counter(id(p) for m in module.modules() for p in m._parameters.values()
                      if p is not None)
    uses: dict[fx.Node, list[_Use]] = {}
    unsafe: set[fx.Node] = set()
    for use in found:
        source = use.node.args[0]
        shared = (reads.get((id(use.owner), use.name), 0) > 1
                  or reads.get((id(use.owner), ""), 0) > 1 or holders[id(use.weight)] > 1)
        if shared or use.weight.dim() != 2:
            unsafe.add(source)
        uses.setdefault(source, []).append(use)
    return {source: readers for source, readers in uses.items() if source not in unsafe}


def _use(module: fx.GraphModule, node: fx.Node) -> _Use | None:
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    if node.op == "call_function" and node.target is _LINEAR:
        weight = node.args[1]
        if isinstance(weight, fx.Node) and weight.op == "get_attr":
            prefix, _, name = weight.target.rpartition(".")
            return _Use(node, module.get_submodule(prefix), name)
    if node.op == "call_module":
        owner = module.get_submodule(node.target)
        name = getattr(owner, "int8_input_weight", None)
        if name is not None and len(node.args) == 1:
            return _Use(node, owner, name)
    return None


def _input_ranges(module: fx.GraphModule, sources: Iterable[fx.Node],
                  batches: Iterable[dict[str, torch.Tensor]],
                  ) -> tuple[dict[fx.Node, torch.Tensor], dict[fx.Node, torch.dtype]]:
    """Return each source activation's largest magnitude per channel (its last dimension),
    and its dtype."""
    wanted = set(sources)
    ranges: dict[fx.Node, torch.Tensor] = {}
    dtypes: dict[fx.Node, torch.dtype] = {}
    with torch.no_grad():
        for batch in batches:
            stepper = GraphStepper(module, batch)
            for node in stepper.steps_through(wanted):
                if node in wanted:
                    dtypes[node] = stepper.value(node).dtype
                    value = stepper.value(node).detach().float()
                    most = value.abs().reshape(-1, value.shape[-1]).amax(dim=0)
                    ranges[node] = most if node not in ranges else torch.maximum(ranges[node],
                                                                                 most)
            stepper.clear()
    return ranges, dtypes


def _int8_errors(module: fx.GraphModule, uses: dict[fx.Node, list[_Use]],
                 scales: dict[fx.Node, torch.Tensor], batches: list[dict[str, torch.Tensor]],
                 ) -> dict[fx.Node, tuple[float, float]]:
    """Return, for each input in `uses`, the relative L2 error of its MatMuls' outputs under
    onnxruntime's dynamic int8 (input uint8 per tensor, weight int8 per output channel), as it
    is and divided by its `scales`, measured on `batches`' first `_ERROR_ROWS` rows."""
    squared = {source: torch.zeros(3, dtype=torch.float64) for source in uses}
    rows = dict.fromkeys(uses, 0)
    with torch.no_grad():
        for batch in batches:
            stepper = GraphStepper(module, batch)
            for node in stepper.steps_through(uses):
                if node in uses and rows[node] < _ERROR_ROWS:
                    value = stepper.value(node).detach()
                    # the rows measured, and only they, in float32
                    x = value.reshape(-1, value.shape[-1])[:_ERROR_ROWS - rows[node]].float()
                    rows[node] += x.shape[0]
                    for use in uses[node]:
                        squared[node] += _squared_int8_errors(x, use.weight.detach().float(),
                                                              scales[node])
            stepper.clear()
            if min(rows.values()) >= _ERROR_ROWS:
                break
    errors = {}
    for source, sums in squared.items():
        plain, smoothed, reference = sums.tolist()
        reference = max(reference, 1e-30)
        errors[source] = ((plain / reference) ** 0.5, (smoothed / reference) ** 0.5)
    return errors


def _squared_int8_errors(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                         ) -> torch.Tensor:
    """Return Σ(int8 x Wᵀ - x Wᵀ)² with `x` as it is, Σ of the same with `x` divided by `scale`
    and W's columns times it, and Σ(x Wᵀ)²: the input is quantized per tensor (its range is the
    whole `x`'s), the product taken `_CHUNK_ROWS` rows at a time."""
    scale = scale.to(x.device, torch.float32)
    plain_x, smoothed_x = fake_uint8_asymmetric(x), fake_uint8_asymmetric(x / scale)
    plain_w = fake_int8_symmetric(weight, axis=0)
    smoothed_w = fake_int8_symmetric(weight * scale, axis=0)
    sums = torch.zeros(3, dtype=torch.float64)
    for start in range(0, x.shape[0], _CHUNK_ROWS):
        rows = slice(start, start + _CHUNK_ROWS)
        exact = x[rows] @ weight.T
        sums[0] += float((plain_x[rows] @ plain_w.T - exact).pow(2).sum())
        sums[1] += float((smoothed_x[rows] @ smoothed_w.T - exact).pow(2).sum())
        sums[2] += float(exact.pow(2).sum())
    return sums


def _scale(activation: torch.Tensor, alpha: float) -> torch.Tensor:
    """Return s_j = (max|x_j| / the median channel's)^α: the input's outlier channels are
    divided, the others hardly touched.

    A channel's measured range is floored at `_QUIET_CHANNEL` of the largest: one that never
    fired on the calibration samples (a ReLU unit) may fire later, and divided by a tiny s_j it
    would set the whole tensor's int8 range.
    """
    floor = max(float(activation.max()) * _QUIET_CHANNEL, 1e-8)
    ranges = activation.clamp(min=floor)
    scale = (ranges / ranges.median()) ** alpha
    return scale.clamp(1 / _MOST_SCALE, _MOST_SCALE)
