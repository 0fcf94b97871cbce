"""How much each layer's approximation error costs the model's outputs: its sensitivity.

A layer's method prepares an `Approximation` that prices every size in squared output error on
the layer's own inputs; how much that error matters to the model's outputs differs by layer.
`measure_sensitivities` sets each layer in turn to its planned size and reruns the model:
exact, but one forward pass per layer, which a billion-parameter model cannot afford (154
passes). `estimate_sensitivities` predicts the loss a truncation causes instead, to second order: the distillation loss is zero,
with zero gradient, at the original's outputs, so perturbing layer l's outputs by δ (its weight
error ΔW = W − A_r B_r times its inputs) costs about ½ δᵀ H_l δ, with H_l the loss's Hessian seen
from that layer's outputs (the Gauss-Newton matrix Jᵀ H J).

That matrix is never formed: a random output gradient g whose covariance is the loss's Hessian
in the outputs (for logits, p − e_y with y drawn from the tempered softmax p; for the normalized
MSE and the cosine terms, scaled Gaussian vectors) is backpropagated once, and each layer's
output gradient g_l then has covariance H_l. The predicted loss is ½ Σ_rows (g_lᵀ δ)², summed
over each output row (a token, a pixel of a conv's output), which drops only the cross-row terms.
Divided by the layer's squared error at the same rank it is the layer's sensitivity, on the same
scale as the measured one up to a factor common to all layers, which the allocation ignores.
A tied head's table is also its model's input embedding: the rows its truncation changes cost
the embedding's outputs too, and both uses' predicted losses add up (the measured sensitivity
sees both, since the weight they read is one).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import fx
from torch.nn import functional as F

from compressor.methods import Approximation
from compressor.plan.layers import (
    layer_calls,
    layer_input,
    owner_name,
    run_recording,
    tied_embedding_call,
    weight_target,
)
from compressor.plan.planning import Plan
from compressor.runtime.graph import GraphStepper
from compressor.runtime.layers import LayerInfo, layer_weight
from compressor.runtime.objectives import IGNORED, KL_TEMPERATURE, distillation_loss
from compressor.runtime.outputs import run_outputs

# Output numbers of a layer multiplied out at a time: as many rows as hold this many (an output
# layer's rows are vocabulary-wide: 1,024 of Gemma-3's took 1 GiB in float32 and 2 GiB in
# float64, for the residual's effect and for the gradient each), at least one.
_NUMBERS_PER_CHUNK = 1 << 22


def measure_sensitivities(teacher: fx.GraphModule, plan: Plan,
                          prepared: dict[str, Approximation], batch: dict[str, torch.Tensor],
                          kinds: list[str]) -> dict[str, float]:
    """Return each prepared layer's loss per unit of squared output error, measured: each
    layer alone is set to its planned size in the original model, and the distillation loss
    this causes on `batch`, divided by the layer's own squared error at that size, is its
    sensitivity. Each weight is restored; the teacher is unchanged afterwards."""
    sensitivities: dict[str, float] = {}
    with torch.no_grad():
        reference = run_outputs(teacher, batch)
        for entry in plan.compressed:
            layer_factors = prepared.get(entry.layer.name)
            if layer_factors is None:
                continue
            error = layer_factors.error(entry.size)
            if error <= 0:
                sensitivities[entry.layer.name] = 0.0
                continue
            weight = layer_weight(teacher, entry.layer)  # a view of the stored tensor
            saved = weight.detach().clone()
            truncated = layer_factors.product(entry.size)
            weight.copy_(truncated.reshape(entry.layer.weight_shape).to(weight.dtype))
            try:
                loss = float(distillation_loss(run_outputs(teacher, batch), reference, kinds))
            finally:
                weight.copy_(saved)
            sensitivities[entry.layer.name] = loss / error
    return sensitivities


def estimate_sensitivities(teacher: fx.GraphModule, plan: Plan,
                           prepared: dict[str, Approximation],
                           batches: list[dict[str, torch.Tensor]] | dict[str, torch.Tensor],
                           kinds: list[str], seed: int = 0) -> dict[str, float]:
    """Return each prepared layer's predicted loss per unit of squared output error at its
    planned size (see the module docstring), on the same scale as `measure_sensitivities` up
    to a factor common to all layers: one forward and backward pass per batch of `batches`
    (one batch, or several: their predictions are averaged, weighted by their samples). The teacher is unchanged afterwards."""
    if isinstance(batches, dict):
        batches = [batches]
    layers = {p.layer.name: (p.layer, p.size) for p in plan.compressed if p.layer.name in prepared}
    predicted = dict.fromkeys(layers, 0.0)

    tied: dict[str, torch.Tensor] = {}  # a tied head's residual, until its table's rows use it

    def on_gradient(name: str, x: torch.Tensor, gradient: torch.Tensor, rows: bool) -> None:
        layer, rank = layers[name]
        residual = tied.pop(name, None)
        if residual is None:
            weight = layer_weight(teacher, layer).detach().reshape(layer.out_features, -1)
            # W - product, in the product's own memory: one table-sized tensor, not two (the
            # tied table's is 671 MB for Gemma-3); one layer at a time
            residual = prepared[name].product(rank).neg_().add_(weight)
            if layer.tied_embedding and not rows:  # the table's rows come next (backward)
                tied[name] = residual
        loss = (_predicted_rows_loss(residual, x, gradient.detach()) if rows
                else _predicted_loss(layer, residual, x, gradient.detach()))
        predicted[name] += share * loss

    share = 1.0
    generator = torch.Generator().manual_seed(seed)
    parameters = [p for p in teacher.parameters() if p.requires_grad]
    for parameter in parameters:  # no weight gradients: only the layers' output gradients
        parameter.requires_grad_(False)
    try:
        probe = _GradientProbe(teacher, set(layers), on_gradient)
        sizes = [len(next(iter(batch.values()))) for batch in batches]
        for batch, size in zip(batches, sizes, strict=True):
            share = size / sum(sizes)  # each batch's loss is a mean: the whole's is their mean
            with torch.enable_grad():
                outputs = probe.run_batch(batch)
                surrogate = sum((out * _output_gradient(out.detach(), kind, generator)).sum()
                                for out, kind in zip(outputs, kinds, strict=True)
                                if kind != IGNORED and out.requires_grad)
                del outputs
                if isinstance(surrogate, torch.Tensor):
                    surrogate.backward()
                del surrogate
    finally:
        for parameter in parameters:
            parameter.requires_grad_(True)
    sensitivities = {}
    for name, (_, rank) in layers.items():
        error = prepared[name].error(rank)
        sensitivities[name] = predicted[name] / error if error > 0 else 0.0
    return sensitivities


def probe_bytes_per_sample(teacher: fx.GraphModule, plan: Plan,
                           sample: dict[str, torch.Tensor]) -> int:
    """Return about how much memory `estimate_sensitivities` holds per sample of its batch:
    each probed layer's input (layers reading one tensor count it once), times three for what
    autograd saves besides. Measured by running `sample`, one sample, through the model."""
    inputs: list[torch.Tensor] = []  # held, so that no two live inputs share an address

    def record(layer: LayerInfo, x: torch.Tensor) -> None:
        inputs.append(x)

    run_recording(teacher, [p.layer for p in plan.compressed], sample, record)
    storages = {x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in inputs}
    return max(1, 3 * sum(storages.values()))


class _GradientProbe:
    """Run the graph with autograd, handing each named layer's input and output gradient to
    `on_gradient(name, input, gradient, rows)` during the backward pass. A tied head's table is
    read by its input embedding too: that call hands its token ids and its output gradient
    with `rows` True (the head's truncation changes the rows it reads)."""

    def __init__(self, module: fx.GraphModule, names: set[str],
                 on_gradient: Callable[[str, torch.Tensor, torch.Tensor, bool], None]) -> None:
        self.module = module
        self._calls = {node: (name, False) for node, name in layer_calls(module).items()
                       if name in names}
        for node in module.graph.nodes:
            if node.op == "call_function" and tied_embedding_call(node):
                name = owner_name(weight_target(node))
                if name in names:
                    self._calls[node] = (name, True)
        self._on_gradient = on_gradient

    def run_batch(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        stepper = GraphStepper(self.module, batch)
        try:
            for node in stepper.nodes():
                name, rows = self._calls.get(node, (None, False))
                x = None if name is None else stepper.value(layer_input(node)).detach()
                stepper.step(node)
                if name is not None:
                    stepper.env[node] = self._hooked(name, x, stepper.value(node), rows)
            return stepper.outputs()
        finally:
            # The stepper keeps the outputs, whose autograd graph holds the hooks: a cycle
            # through C++ that Python's collector cannot see, which kept every factor alive.
            stepper.clear()

    def _hooked(self, name: str, x: torch.Tensor, result: object, rows: bool) -> object:
        if not isinstance(result, torch.Tensor):
            return result
        if not result.requires_grad:  # nothing before it is probed: the backward starts here
            result = result.detach().requires_grad_()
        on_gradient = self._on_gradient
        result.register_hook(lambda gradient: on_gradient(name, x, gradient, rows))
        return result


def _predicted_loss(layer: LayerInfo, residual: torch.Tensor, x: torch.Tensor,
                    gradient: torch.Tensor) -> float:
    """Return ½ Σ_rows (gᵀ δ)², δ = the residual's effect on each output row."""
    rows = layer.spec.input_rows(layer, x)
    gradients = layer.spec.output_rows(layer, gradient)
    chunk = max(1, _NUMBERS_PER_CHUNK // max(1, gradients.shape[1]))
    total = 0.0
    for start in range(0, gradients.shape[0], chunk):
        delta = layer.spec.effect(layer, rows[start:start + chunk], residual)
        products = (delta.double() * gradients[start:start + chunk].double()).sum(1)
        total += 0.5 * float(products.pow(2).sum())
    return total


def _predicted_rows_loss(residual: torch.Tensor, ids: torch.Tensor,
                         gradient: torch.Tensor) -> float:
    """Return ½ Σ_samples (Σ_positions gᵀ δ)² for a table read by token ids (δ: the residual's
    row each token reads). A token read at several positions carries the same δ to each, so
    the cross-position terms do not cancel as they do for a layer's distinct rows: they are
    kept, within each sample (samples do not interact)."""
    ids = ids.reshape(ids.shape[0], -1) if ids.dim() > 1 else ids.reshape(1, -1)
    gradients = gradient.reshape(*ids.shape, -1)
    total = 0.0
    for sample in range(ids.shape[0]):
        delta = residual[ids[sample]].double()
        total += 0.5 * float((delta * gradients[sample].double()).sum().pow(2))
    return total


def _output_gradient(out: torch.Tensor, kind: str, generator: torch.Generator) -> torch.Tensor:
    """Return a random gradient whose covariance is the Hessian of `output_loss` at the
    original's own output `out` (see `compressor.runtime.objectives`)."""
    out = out.float()
    # Normalized MSE, mean((o - t)²) / var(t): Hessian 2 I / (numel · var).
    scale = math.sqrt(2.0 / (out.numel() * (float(out.var(unbiased=False)) + 1e-8)))
    gradient = torch.randn(out.shape, generator=generator) * scale
    if kind == "logits":  # T² · KL(softmax(t/T) ‖ softmax(o/T)), mean over vectors
        classes = out.shape[-1] if out.dim() >= 2 else 1
        probabilities = F.softmax(out.reshape(-1, classes) / KL_TEMPERATURE, dim=-1)
        drawn = torch.multinomial(probabilities, 1, generator=generator)
        sample = probabilities.scatter_add_(1, drawn, torch.full(drawn.shape, -1.0))  # p - e_y
        gradient += (sample / math.sqrt(sample.shape[0])).reshape(out.shape)
    elif kind == "embedding":  # 1 - cos(o, t), mean over vectors: (I - t̂t̂ᵀ) / (‖t‖² n)
        vectors = out.reshape(-1, out.shape[-1])
        unit = F.normalize(vectors, dim=1)
        noise = torch.randn(vectors.shape, generator=generator)
        tangent = noise - (noise * unit).sum(1, keepdim=True) * unit
        norms = vectors.norm(dim=1, keepdim=True).clamp(min=1e-8)
        gradient += (tangent / (norms * math.sqrt(vectors.shape[0]))).reshape(out.shape)
    return gradient
