"""`tie_inputs`: every output row of a Linear (or GPT-2 Conv1D) weight is one stored row w
(length `in`).

W = w.expand(out, in), a stride-0 view rather than a copy, optionally times a learned scale per
output row: W = s[:, None] * w. θ is (w,) or (w, s): `in` (+ `out`) numbers whatever the layer.
Each w[j] is used by all `out` rows, so autograd sends it the sum of their gradients ("mean":
their average). The scale s is a factor of a row, not a copy of a weight: it is never reduced.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from compressor.errors import ConfigError
from compressor.methods import register_method
from compressor.methods._tying import frozen, reduce_grad
from compressor.methods.base import GradReduction, LayerInfo, LayerStats, Method, MethodOptions
from compressor.runtime.layers import ADDMM, LINEAR


class TiedInputsWeight(nn.Module):
    """Parametrize an (out, in) weight as one row expanded over the outputs (times a scale)."""

    def __init__(self, weight_shape: tuple[int, ...], scaled: bool,
                 grad_reduction: GradReduction = "sum") -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.scaled = scaled
        self.grad_reduction = grad_reduction

    def forward(self, row: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        out_features = self.weight_shape[0]
        row = reduce_grad(row, self.grad_reduction, lambda: row.new_tensor(out_features))
        weight = row.expand(self.weight_shape)  # stride 0 over the outputs: one stored row
        return weight if scale is None else weight * scale[:, None]

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Return w = the column means of W; scaled, (w, s) of the best rank-1 fit s wᵀ."""
        matrix = weight.detach().to(torch.float64)
        if not self.scaled:
            return (matrix.mean(0).to(weight.dtype),)
        U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
        scale, row = U[:, 0], Vh[0] * S[0]
        # Sign and size are free in s wᵀ: make s mostly positive with ‖s‖² = out (s = 1 when
        # every row is already the same), so w looks like a row of W.
        sign = -1.0 if float(scale.sum()) < 0 else 1.0
        norm = matrix.shape[0] ** 0.5
        scale, row = scale * (sign * norm), row * (sign / norm)
        return row.to(weight.dtype).contiguous(), scale.to(weight.dtype).contiguous()


class TiedInputsLinear(nn.Module):
    """Compute a tied-inputs Linear as one dot product per input row, broadcast to the outputs."""

    def __init__(self, out_features: int, row: torch.Tensor, scale: torch.Tensor | None,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.out_features = out_features
        self.row = frozen(row.reshape(1, -1))
        self.scale = None if scale is None else frozen(scale)
        self.bias = None if bias is None else frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.linear(x, self.row)  # (..., 1): x · w, the same for every output
        if self.scale is not None:
            h = h * self.scale
        if self.bias is not None:
            return h + self.bias
        # Expand, then a real tensor: callers may write into a layer's output in place.
        return h.expand(*h.shape[:-1], self.out_features).contiguous()


class TieInputsOptions(MethodOptions):
    """`tie_inputs`: every output row is one stored row (times a learned scale)."""

    name: Literal["tie_inputs"] = "tie_inputs"
    per_output_scale: bool = Field(default=True,
                                   description="give each output row a learned scale")


@register_method
class TieInputs(Method):
    """Every output row is one shared row w: `in` numbers (+ `out` scales)."""

    name = "tie_inputs"
    Options = TieInputsOptions
    layer_kinds = frozenset({LINEAR.name, ADDMM.name})
    size_field = None
    min_size = 1
    ties_output_rows = True

    def compact_numel(self, layer: LayerInfo, size: int) -> float:
        scales = layer.out_features if self.options.per_output_scale else 0
        return float(layer.in_features + scales)

    def size_for_budget(self, layer: LayerInfo, budget: float) -> int | None:
        numel = self.compact_numel(layer, 1)
        if numel > budget or numel >= layer.numel:
            return None
        return 1

    def parametrization(self, layer: LayerInfo, weight: torch.Tensor, size: int,
                        stats: LayerStats | None, grad_reduction: GradReduction = "sum",
                        ) -> nn.Module:
        # The structure is fixed (one row), so the calibration statistics are not used.
        if size != 1:
            raise ConfigError(
                f"tie_inputs has one size (1: a single shared row); got {size} for layer "
                f"{layer.name!r}; remove the size override for this layer"
            )
        return TiedInputsWeight(layer.weight_shape, self.options.per_output_scale, grad_reduction)

    def compact_module(self, layer: LayerInfo, parametrization: nn.Module,
                       theta: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> nn.Module:
        row, scale = (theta[0], None) if len(theta) == 1 else theta
        return TiedInputsLinear(layer.out_features, row, scale, bias)
