"""`tie_rows`: the output rows of W are clustered into k groups; rows in a group are one row.

W = U[idx] reshaped to the kernel, with U (k × in·kh·kw) the shared rows (θ) and idx (out) the
fixed group of each output row, a buffer of the smallest integer dtype. The groups come from
k-means on the rows; given the layer's input Gram matrix G = X Xᵀ, k-means runs in the metric
‖(a − b) X‖ (rows whitened by the Cholesky factor of G), so rows are tied where it costs the
least on real inputs. For either metric the best U for fixed groups is the group mean.
A Conv1d or Conv2d ties output channels (groups=1 convs only: a tied group may span conv
groups). GPT-2's Conv1D ties the output rows of W (the columns of the (in, out) tensor it stores).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from compressor.errors import ConfigError, ExportError
from compressor.methods import register_method
from compressor.methods._tying import (
    copy_counts,
    frozen,
    group_means,
    index_dtype,
    kmeans_rows,
    reduce_grad,
    whiten,
)
from compressor.methods.base import (
    GradReduction,
    LayerInfo,
    LayerStats,
    Method,
    MethodOptions,
    int_bits,
)
from compressor.runtime.layers import ADDMM, CONV1D, CONV2D, LINEAR


class TiedRowsWeight(nn.Module):
    """Parametrize a weight as U[idx]: output row i is shared row idx[i] of U."""

    def __init__(self, weight_shape: tuple[int, ...], idx: torch.Tensor, groups: int,
                 grad_reduction: GradReduction = "sum") -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.groups = groups
        self.grad_reduction = grad_reduction
        self.register_buffer("idx", idx.to(index_dtype(groups)))

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        idx = self.idx.to(torch.int64)
        rows = reduce_grad(rows, self.grad_reduction,
                           lambda: copy_counts(idx, self.groups)[:, None])
        return rows.index_select(0, idx).reshape(self.weight_shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        """Return U = the mean of the rows of W in each group (the least-squares U)."""
        matrix = weight.detach().reshape(weight.shape[0], -1)
        return (group_means(matrix, self.idx, self.groups).to(weight.dtype),)


class TiedRowsLinear(nn.Module):
    """Compute a tied-rows Linear as k outputs x Uᵀ, then gather them into the `out` outputs."""

    def __init__(self, rows: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.rows = frozen(rows)
        self.register_buffer("idx", idx.detach().clone())
        self.bias = None if bias is None else frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.rows).index_select(-1, self.idx.to(torch.int64))
        return y if self.bias is None else y + self.bias


class TiedRowsConv(nn.Module):
    """Compute a tied-rows Conv1d or Conv2d as a conv with k filters, then gather its output
    channels."""

    def __init__(self, layer: LayerInfo, rows: torch.Tensor, idx: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.layer = layer
        self.filters = frozen(rows.reshape(rows.shape[0], *layer.weight_shape[1:]))
        self.register_buffer("idx", idx.detach().clone())
        positions = (1,) * len(layer.kernel_size)  # the bias broadcasts over every position
        self.bias = None if bias is None else frozen(bias.reshape(-1, *positions))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer.spec.apply(self.layer, x, self.filters, None)
        y = h.index_select(1, self.idx.to(torch.int64))
        return y if self.bias is None else y + self.bias


class TieRowsOptions(MethodOptions):
    """`tie_rows`: output rows clustered into `groups` shared rows."""

    name: Literal["tie_rows"] = "tie_rows"
    groups: int | None = Field(default=None, ge=1,
                               description="shared rows of every layer; null: from the budget")
    init: Literal["kmeans", "activation_aware"] = Field(
        default="activation_aware",
        description="k-means on the rows (kmeans), or in the metric of the layer's calibration "
        "inputs, so rows are tied where it costs the least on real inputs (activation_aware)")


@register_method
class TieRows(Method):
    """k shared rows and one group index per output row: k·in + out·bits/32 numbers."""

    name = "tie_rows"
    Options = TieRowsOptions
    layer_kinds = frozenset({LINEAR.name, ADDMM.name, CONV1D.name, CONV2D.name})
    size_field = "groups"
    min_size = 1
    ties_output_rows = True

    @property
    def needs_input_stats(self) -> bool:
        return self.options.init == "activation_aware"

    def compact_numel(self, layer: LayerInfo, size: int) -> float:
        return size * layer.in_features + layer.out_features * int_bits(size) / 32

    def size_for_budget(self, layer: LayerInfo, budget: float) -> int | None:
        if layer.groups != 1:
            return None
        best = None
        for bits in (8, 16, 32):
            groups = math.floor((budget - layer.out_features * bits / 32) / layer.in_features)
            # k = out ties nothing: at most out - 1 groups.
            groups = min(groups, 2**bits, layer.out_features - 1)
            while groups >= 1 and self.compact_numel(layer, groups) > budget:
                groups -= 1
            if groups >= 1 and (best is None or groups > best):
                best = groups
        if best is None or self.compact_numel(layer, best) >= layer.numel:
            return None
        return best

    def parametrization(self, layer: LayerInfo, weight: torch.Tensor, size: int,
                        stats: LayerStats | None, grad_reduction: GradReduction = "sum",
                        ) -> nn.Module:
        if not 1 <= size <= layer.out_features:
            raise ConfigError(
                f"tie_rows needs 1 <= groups <= out_features={layer.out_features} for layer "
                f"{layer.name!r}; got groups={size}"
            )
        rows = weight.detach().reshape(weight.shape[0], -1)
        if stats is not None and stats.gram is not None:
            if tuple(stats.gram.shape) != (layer.in_features,) * 2:
                raise ValueError(
                    f"layer {layer.name!r}: input Gram matrix is {tuple(stats.gram.shape)}, "
                    f"expected {(layer.in_features,) * 2}"
                )
            whitened = whiten(rows, stats.gram)
            rows = rows if whitened is None else whitened
        idx = kmeans_rows(rows, size)
        return TiedRowsWeight(layer.weight_shape, idx, size, grad_reduction)

    def compact_module(self, layer: LayerInfo, parametrization: nn.Module,
                       theta: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> nn.Module:
        (rows,) = theta
        idx = parametrization.idx
        if layer.spec.has_kernel:
            if layer.groups != 1:
                raise ExportError(
                    f"tie_rows has no factorized form for the grouped conv {layer.name!r} "
                    f"(groups={layer.groups}); use export.form='dense' or skip this layer"
                )
            return TiedRowsConv(layer, rows, idx, bias)
        return TiedRowsLinear(rows, idx, bias)
