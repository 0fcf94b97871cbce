"""`lowrank`: W = A @ B with A (out × r) and B (r × in·kh·kw).

θ starts from the layer's decomposition (`factors`: a truncated SVD, activation-aware given the
layer's input statistics), which calibration prepares once and the sensitivity allocation
prices every rank with; B is then re-solved on the compressed model's own inputs
(`sequential`). Its compact forms (`modules`): two matmuls (a Linear, GPT-2's Conv1D), a conv
with r filters then a pointwise conv (Conv1d, Conv2d), a narrow table then a projection.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from compressor.errors import ConfigError
from compressor.methods import register_method
from compressor.methods.base import GradReduction, Method, MethodOptions
from compressor.methods.lowrank.factors import LowRankFactors, decompose
from compressor.methods.lowrank.modules import (
    LowRankConv1d,
    LowRankConv2d,
    LowRankEmbedding,
    LowRankLinear,
    LowRankWeight,
    TiedLowRankHead,
)
from compressor.methods.lowrank.sequential import correct_second_factor_
from compressor.runtime.layers import (
    ADDMM,
    CONV1D,
    CONV2D,
    EMBEDDING,
    LINEAR,
    InputMoments,
    LayerInfo,
    LayerStats,
)

# Ranks are rounded down to a multiple of this (fast matmul tiles) when that gives up at most
# _ROUNDING_COST of the layer's budget.
RANK_MULTIPLE = 8
_ROUNDING_COST = 0.02
# A conv's compact module by its kernel's axes.
_CONV_MODULES = {1: LowRankConv1d, 2: LowRankConv2d}


class LowRankOptions(MethodOptions):
    """`lowrank`: W = A @ B."""

    name: Literal["lowrank"] = "lowrank"
    rank: int | None = Field(default=None, ge=1,
                             description="the rank of every layer; null: from the budget")
    init: Literal["svd", "activation_aware", "sequential"] = Field(
        default="sequential",
        description="truncated SVD of W; activation_aware (whitened by each layer's calibration "
        "inputs); sequential (activation_aware, then each layer's second factor re-solved on "
        "the inputs the compressed model gives it)")


@register_method
class LowRank(Method):
    """W = A @ B: `rank` numbers per output plus `rank` per input."""

    name = "lowrank"
    Options = LowRankOptions
    layer_kinds = frozenset({LINEAR.name, ADDMM.name, CONV1D.name, CONV2D.name, EMBEDDING.name})
    size_field = "rank"
    min_size = 1
    ties_output_rows = False

    size_step = RANK_MULTIPLE

    @property
    def needs_input_stats(self) -> bool:
        return self.options.init != "svd"

    @property
    def corrects_sequentially(self) -> bool:
        return self.options.init == "sequential"

    @property
    def prepares(self) -> bool:
        return True

    def compact_numel(self, layer: LayerInfo, size: int) -> float:
        return float(size * (layer.out_features + layer.in_features))

    def size_for_budget(self, layer: LayerInfo, budget: float) -> int | None:
        rank = min(math.floor(budget / (layer.out_features + layer.in_features)),
                   min(layer.out_features, layer.in_features))
        rounded = rank - rank % RANK_MULTIPLE
        if rounded >= RANK_MULTIPLE and (rank - rounded) / rank <= _ROUNDING_COST:
            rank = rounded
        if rank < 1 or self.compact_numel(layer, rank) >= layer.numel:
            return None
        return rank

    def break_even_size(self, layer: LayerInfo) -> int:
        return min(math.ceil(layer.numel / (layer.out_features + layer.in_features)) - 1,
                   min(layer.out_features, layer.in_features))

    def factorize(self, layer: LayerInfo, weight: torch.Tensor,
                  stats: LayerStats | None) -> LowRankFactors:
        """Return the layer's full decomposition (activation-aware when `stats` are given)."""
        gram = None if stats is None else stats.gram
        counts = None if stats is None else stats.row_counts
        return decompose(weight.reshape(weight.shape[0], -1), gram, counts)

    def prepare(self, layer: LayerInfo, weight: torch.Tensor, stats: LayerStats | None,
                size: int | None) -> LowRankFactors:
        """Return the layer's decomposition, kept up to the largest rank the allocation or
        the initialization can use (the break-even rank, or the planned one)."""
        keep = max(self.break_even_size(layer), size or 0)
        return self.factorize(layer, weight, stats).truncated(keep)

    def kept_tensors(self, prepared: LowRankFactors) -> dict[str, torch.Tensor]:
        # What `LowRankFactors` keeps: A, or B and weight_to_A for a tall W (and B where it
        # cannot be made again from W).
        kept = {"A": prepared.A, "B": prepared.B, "weight_to_A": prepared.weight_to_A}
        return {"energy": prepared.energy,
                **{name: tensor for name, tensor in kept.items() if tensor is not None}}

    def from_kept_tensors(self, layer: LayerInfo, weight: torch.Tensor,
                          tensors: dict[str, torch.Tensor]) -> LowRankFactors:
        matrix = weight.detach().reshape(weight.shape[0], -1)
        A, B, energy = tensors.get("A"), tensors.get("B"), tensors["energy"]
        weight_to_A = tensors.get("weight_to_A")
        # exactly one of A and weight_to_A, B beside weight_to_A, every shape fitting W
        fits = (A is None) != (weight_to_A is None) and (A is not None or B is not None)
        if fits:
            rank = (A if A is not None else weight_to_A).shape[1]
            expected = {"A": (matrix.shape[0], rank), "B": (rank, matrix.shape[1]),
                        "weight_to_A": (matrix.shape[1], rank)}
            fits = all(tensors[name].shape == shape for name, shape in expected.items()
                       if name in tensors) and energy.dim() == 1
        if not fits:
            raise ValueError(f"kept factors of {layer.name!r} do not fit its "
                             f"{tuple(matrix.shape)} weight")
        if A is None:
            return LowRankFactors(None, B, energy, matrix, weight_to_A)
        return LowRankFactors(A, B, energy, None if B is not None else matrix)

    def correct_(self, layer: LayerInfo, theta: tuple[torch.Tensor, ...], weight: torch.Tensor,
                 moments: InputMoments, check: InputMoments | None = None) -> float:
        A, B = theta
        return correct_second_factor_(A, B, weight, moments, check)

    def parametrization(self, layer: LayerInfo, weight: torch.Tensor, size: int,
                        stats: LayerStats | None, grad_reduction: GradReduction = "sum",
                        ) -> nn.Module:
        full_rank = min(layer.out_features, layer.in_features)
        if not 1 <= size <= full_rank:
            raise ConfigError(
                f"rank {size} is out of range for layer {layer.name!r}: its weight is "
                f"{layer.out_features}×{layer.in_features}, so the rank must be 1..{full_rank}; "
                "fix the override")
        # A and B are not copies of one another: grad_reduction has nothing to reduce here.
        factors = None if stats is None else stats.prepared
        if factors is None and stats is not None:
            factors = self.factorize(layer, weight, stats)
        return LowRankWeight(layer.weight_shape, size, factors)

    def compact_module(self, layer: LayerInfo, parametrization: nn.Module,
                       theta: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> nn.Module:
        A, B = theta
        if layer.spec.reads_rows:
            return LowRankEmbedding(A, B)
        if layer.spec.has_kernel:
            return _CONV_MODULES[len(layer.kernel_size)](layer, A, B, bias)
        if layer.tied_embedding:  # its rows are the input table's: `tied_embedding()`
            return TiedLowRankHead(A, B, bias)
        return LowRankLinear(A, B, bias)  # W = A @ B as (out, in), whatever the stored layout
