"""`share_values`: every weight is one of K shared values (Deep Compression weight sharing).

W = c[idx] with c (K,) the codebook (θ) and idx (the weight's shape) the fixed entry of each
weight, a buffer of the smallest integer dtype (uint8 for K <= 256, else uint16). The clusters
come from 1-D k-means over the weights (linear init over [min, max], sort-based Lloyd steps);
the calibration statistics are not used. The best codebook for fixed clusters is the cluster
means. Storage: K numbers plus numel · bits / 32 for the indices.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from compressor.errors import ConfigError
from compressor.methods import register_method
from compressor.methods._tying import (
    copy_counts,
    frozen,
    group_means,
    index_dtype,
    kmeans_values,
    reduce_grad,
)
from compressor.methods.base import (
    GradReduction,
    LayerInfo,
    LayerStats,
    Method,
    MethodOptions,
    int_bits,
)
from compressor.runtime.layers import ADDMM, CONV1D, CONV2D, EMBEDDING, LINEAR

# The largest codebook: indices then fit in 16 bits.
MAX_VALUES = 65536


def _gather(codebook: torch.Tensor, idx: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    # A plain Gather on the flat indices (codebook[idx] would export as GatherND).
    return codebook.index_select(0, idx.reshape(-1).to(torch.int32)).reshape(shape)


class SharedValuesWeight(nn.Module):
    """Parametrize a weight as c[idx]: every weight is one entry of the codebook c."""

    def __init__(self, idx: torch.Tensor, values: int,
                 grad_reduction: GradReduction = "sum") -> None:
        super().__init__()
        self.values = values
        self.grad_reduction = grad_reduction
        self.register_buffer("idx", idx.to(index_dtype(values)))

    def forward(self, codebook: torch.Tensor) -> torch.Tensor:
        codebook = reduce_grad(codebook, self.grad_reduction,
                               lambda: copy_counts(self.idx, self.values))
        return _gather(codebook, self.idx, tuple(self.idx.shape))

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor]:
        """Return c = the mean of the weights sharing each entry (the least-squares codebook)."""
        return (group_means(weight.detach().reshape(-1), self.idx, self.values)
                .to(weight.dtype),)


class SharedValuesLayer(nn.Module):
    """Compute a layer whose weight is gathered from a codebook by small-integer indices, then
    applied as its kind applies a weight (a Linear's matmul, a convolution)."""

    def __init__(self, layer: LayerInfo, codebook: torch.Tensor, idx: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        self.layer = layer
        self.codebook = frozen(codebook)
        self.register_buffer("idx", idx.detach().clone())
        self.bias = None if bias is None else frozen(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _gather(self.codebook, self.idx, tuple(self.idx.shape))
        return self.layer.spec.apply(self.layer, x, weight, self.bias)

    def tied_embedding(self) -> SharedValuesEmbedding:
        """The input-embedding use of this layer's weight (a tied LM head): the same codebook
        and indices (one copy in the export), the token's index rows gathered."""
        rows = SharedValuesEmbedding.__new__(SharedValuesEmbedding)
        nn.Module.__init__(rows)
        rows.codebook = self.codebook
        rows.register_buffer("idx", self.idx)
        return rows


class SharedValuesEmbedding(nn.Module):
    """Look up the small-integer index rows of the tokens, then their values in the codebook."""

    def __init__(self, codebook: torch.Tensor, idx: torch.Tensor) -> None:
        super().__init__()
        self.codebook = frozen(codebook)
        self.register_buffer("idx", idx.detach().clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(ids, self.idx)
        return self.codebook.index_select(0, rows.reshape(-1).to(torch.int32)).reshape(rows.shape)


class ShareValuesOptions(MethodOptions):
    """`share_values`: every weight is one of `values` shared values."""

    name: Literal["share_values"] = "share_values"
    values: int | None = Field(default=None, ge=2, le=MAX_VALUES,
                               description="the codebook size K of every layer; null: from the "
                               "budget")


@register_method
class ShareValues(Method):
    """K shared values and one index per weight: K + numel·bits/32 numbers."""

    name = "share_values"
    Options = ShareValuesOptions
    layer_kinds = frozenset({LINEAR.name, ADDMM.name, CONV1D.name, CONV2D.name, EMBEDDING.name})
    size_field = "values"
    min_size = 2
    ties_output_rows = False

    def compact_numel(self, layer: LayerInfo, size: int) -> float:
        return size + layer.numel * int_bits(size) / 32

    def size_for_budget(self, layer: LayerInfo, budget: float) -> int | None:
        best = None
        for bits in (8, 16):
            values = min(math.floor(budget - layer.numel * bits / 32), 2**bits, MAX_VALUES)
            while values >= 2 and self.compact_numel(layer, values) > budget:
                values -= 1
            if values >= 2 and (best is None or values > best):
                best = values
        if best is None or self.compact_numel(layer, best) >= layer.numel:
            return None
        return best

    def parametrization(self, layer: LayerInfo, weight: torch.Tensor, size: int,
                        stats: LayerStats | None, grad_reduction: GradReduction = "sum",
                        ) -> nn.Module:
        if not 2 <= size <= MAX_VALUES:
            raise ConfigError(
                f"share_values needs 2 <= values <= {MAX_VALUES} for layer {layer.name!r}; "
                f"got values={size}"
            )
        idx = kmeans_values(weight, size)
        return SharedValuesWeight(idx, size, grad_reduction)

    def compact_module(self, layer: LayerInfo, parametrization: nn.Module,
                       theta: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> nn.Module:
        (codebook,) = theta
        idx = parametrization.idx
        if layer.spec.reads_rows:  # gather the index rows first: cheaper than the whole table
            return SharedValuesEmbedding(codebook, idx)
        return SharedValuesLayer(layer, codebook, idx, bias)
