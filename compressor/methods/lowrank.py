"""`lowrank`: W = A @ B with A (out × r) and B (r × in·kh·kw).

Initialization is a truncated SVD of W, or, given the layer's input statistics, the
activation-aware solution (SVD-LLM style): with the input Gram matrix G = X Xᵀ = L Lᵀ, the rank-r
product minimizing ‖(W − A B) X‖ is the truncated SVD of W L mapped back through L⁻¹. An
embedding table weighs each row by how often the calibration data reads it (rows never read
keep a floor weight, so unseen tokens stay usable). One decomposition serves every rank: its
squared singular values are the output error each dropped direction costs, which is what the
planner's sensitivity allocation reads. A Conv2d factorizes into a kh×kw conv with r filters
followed by a 1×1 conv; an embedding into a narrow table followed by a projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn
from torch.nn import functional as F

from compressor.errors import ConfigError
from compressor.methods import register_method
from compressor.methods.base import (
    GradReduction,
    LayerInfo,
    LayerStats,
    Method,
    MethodOptions,
    damped_cholesky,
)

# Relative damping added to the Gram diagonal so its Cholesky factor exists and is well-conditioned.
_GRAM_DAMPING = 1e-4
# An embedding row read n times weighs n / (mean reads per row) + this: rows never read count too.
_UNSEEN_ROW_WEIGHT = 1.0
# Ranks are rounded down to a multiple of this (fast matmul tiles) when that gives up at most
# _ROUNDING_COST of the layer's budget.
RANK_MULTIPLE = 8
# Rows of W taken to float64 at a time when B is made again from it.
_ROWS_PER_CHUNK = 4096
_ROUNDING_COST = 0.02


@dataclass
class LowRankFactors:
    """A full decomposition W = A @ B, directions sorted by the output error they carry.

    `A[:, :r] @ B[:r]` (`product(r)`) is the best rank-r product (in the metric of the inputs it
    was given), and `energy[r:].sum()` its squared output error on the calibration inputs (on W
    itself without them).

    B need not be kept: with A = U √S from the SVD of W L (L the whitening, or the identity),
    B = √S Vᵀ L⁻¹ = S⁻¹ Aᵀ W, whatever L was. So `truncated` keeps A alone, with W itself
    (`weight`, the original's tensor, shared) to make B from when it is asked for (`second`):
    between calibration and initialization a large model then holds A, not A and B (a down
    projection's B is 2.75 times its A). An embedding, whose B comes from row-weighted W, keeps B.
    """

    A: torch.Tensor  # (out, k)
    B: torch.Tensor | None  # (k, in); None: made from `weight` (see `second`)
    energy: torch.Tensor  # (k,) float64, decreasing
    weight: torch.Tensor | None = None  # (out, in): W, where B = S⁻¹ Aᵀ W holds

    def error(self, rank: int) -> float:
        """Return the squared output error of the rank-`rank` truncation."""
        return float(self.energy[rank:].sum())

    def first(self, rank: int) -> torch.Tensor:
        """Return A's first `rank` columns."""
        return self.A[:, :rank]

    def second(self, rank: int) -> torch.Tensor:
        """Return B's first `rank` rows (made from W in float64, a chunk of rows at a time,
        when B is not kept)."""
        if self.B is not None:
            return self.B[:rank]
        singular = self.energy[:rank].sqrt().clamp(min=float(self.energy[0].sqrt()) * 1e-15
                                                   + 1e-300)
        B = torch.zeros(rank, self.weight.shape[1], dtype=torch.float64)
        for start in range(0, self.weight.shape[0], _ROWS_PER_CHUNK):
            a = self.A[start:start + _ROWS_PER_CHUNK, :rank].double()
            B += a.T @ self.weight[start:start + _ROWS_PER_CHUNK].double()
        return (B / singular[:, None]).to(self.A.dtype)

    def product(self, rank: int) -> torch.Tensor:
        """Return the best rank-`rank` product A[:, :rank] @ B[:rank]."""
        return self.first(rank) @ self.second(rank)

    def truncated(self, rank: int) -> LowRankFactors:
        """Return the factors kept up to `rank` (own copies; every energy is kept, so `error`
        still prices every rank). B is dropped where it can be made again from W."""
        keep_b = self.weight is None
        if rank >= self.A.shape[1] and (keep_b or self.B is None):
            return self
        rank = min(rank, self.A.shape[1])
        return LowRankFactors(self.A[:, :rank].clone(),
                              self.B[:rank].clone() if keep_b else None, self.energy,
                              self.weight)


class LowRankWeight(nn.Module):
    """Parametrize a weight as (A @ B) reshaped to the layer's weight shape."""

    def __init__(self, weight_shape: tuple[int, ...], rank: int,
                 factors: LowRankFactors | None = None) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.rank = rank
        # Used once by right_inverse to initialize θ; not part of the state.
        self.factors = factors

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (A @ B).reshape(self.weight_shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (A, B) of rank `rank` closest to `weight` (on the inputs, when factors from
        calibration statistics are set)."""
        factors, self.factors = self.factors, None  # only needed once: not kept alive
        if factors is None:
            factors = decompose(weight.detach().reshape(weight.shape[0], -1), None, None)
        # Copies: θ must not share storage with the decomposition, which other copies reuse.
        A, B = factors.first(self.rank), factors.second(self.rank)
        return (A.to(weight.dtype, copy=True).contiguous(),
                B.to(weight.dtype, copy=True).contiguous())


def _svd_factors(matrix: torch.Tensor) -> LowRankFactors:
    """Return the SVD of a float64 `matrix` as factors A = U √S, B = √S Vᵀ, energies S².

    Through the eigendecomposition of the smaller of M Mᵀ and Mᵀ M: 3-5× faster than
    `torch.linalg.svd` on the layers of a billion-parameter model (a 2048×5632 weight: 2.5 s
    against 11.5 s on 2 cores). In float64 the squared condition number costs nothing the
    truncation keeps: a direction loses precision only where S² falls below ~1e-16 of the
    largest, and such a direction carries no energy. A B equals M whatever the spectrum (A's
    columns are orthogonal directions of M, B is M projected on them).
    """
    rows, cols = matrix.shape
    wide = rows <= cols
    energy, vectors = torch.linalg.eigh(matrix @ matrix.T if wide else matrix.T @ matrix)
    energy, vectors = energy.flip(0).clamp(min=0), vectors.flip(1)  # decreasing
    # √S, floored so that a direction of no energy divides by a tiny number, not by zero.
    root = energy.clamp(min=float(energy[0]) * 1e-30 + 1e-300).pow(0.25)
    if wide:  # vectors = U: B = √S Vᵀ = Uᵀ M / √S
        return LowRankFactors(vectors * root, (vectors.T @ matrix) / root[:, None], energy)
    # vectors = V: A = U √S = M V / √S
    return LowRankFactors((matrix @ vectors) / root, root[:, None] * vectors.T, energy)


def decompose(matrix: torch.Tensor, gram: torch.Tensor | None,
              row_counts: torch.Tensor | None) -> LowRankFactors:
    """Return the full decomposition of `matrix` (out × in) that truncates best on the inputs.

    With an input Gram G = L Lᵀ: the SVD of W L, mapped back through L⁻¹. With row read counts
    (an embedding): the SVD of D W with D the row weights, mapped back through D⁻¹. Neither:
    the plain SVD. Factors come back in float32, the energies in float64.
    """
    original = matrix.detach()
    matrix = original.to(torch.float64)
    chol = None if gram is None else damped_cholesky(gram, _GRAM_DAMPING)
    if chol is not None:
        whitened = _svd_factors(matrix @ chol)
        # B = (B L) L⁻¹, solved rather than inverted: Lᵀ Bᵀ = (B L)ᵀ.
        B = torch.linalg.solve_triangular(chol.T, whitened.B.T, upper=True).T
        factors = LowRankFactors(whitened.A, B, whitened.energy)
    elif row_counts is not None:
        counts = row_counts.to(torch.float64)
        weight = (counts / counts.mean().clamp(min=1e-12) + _UNSEEN_ROW_WEIGHT).sqrt()
        weighted = _svd_factors(matrix * weight[:, None])
        factors = LowRankFactors(weighted.A / weight[:, None], weighted.B, weighted.energy)
    else:
        factors = _svd_factors(matrix)
    return LowRankFactors(factors.A.float(), factors.B.float(), factors.energy,
                          None if row_counts is not None else original)


class LowRankLinear(nn.Module):
    """Compute a Linear layer as two matmuls: x Bᵀ, then (·) Aᵀ + bias."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.A = nn.Parameter(A.detach(), requires_grad=False)
        self.B = nn.Parameter(B.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)


class LowRankEmbedding(nn.Module):
    """Look up rows of a narrow table A (rows × r), then project them: A[ids] @ B."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor) -> None:
        super().__init__()
        self.A = nn.Parameter(A.detach(), requires_grad=False)
        self.B = nn.Parameter(B.detach(), requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.A) @ self.B


class LowRankConv2d(nn.Module):
    """Compute a Conv2d as a kh×kw conv with r filters, then a 1×1 conv to the outputs."""

    def __init__(self, layer: LayerInfo, A: torch.Tensor, B: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        out_channels, in_channels, kh, kw = layer.weight_shape
        rank = A.shape[1]
        self.spatial = nn.Parameter(B.detach().reshape(rank, in_channels, kh, kw).clone(),
                                    requires_grad=False)
        self.pointwise = nn.Parameter(A.detach().reshape(out_channels, rank, 1, 1).clone(),
                                      requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.spatial, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.pointwise, self.bias)


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
    layer_kinds = frozenset({"linear", "conv2d", "embedding"})
    size_field = "rank"
    min_size = 1
    ties_output_rows = False

    @property
    def needs_input_stats(self) -> bool:
        return self.options.init != "svd"

    @property
    def corrects_sequentially(self) -> bool:
        return self.options.init == "sequential"

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

    @staticmethod
    def break_even_rank(layer: LayerInfo) -> int:
        """Return the largest rank that stores fewer numbers than the dense weight."""
        return min(math.ceil(layer.numel / (layer.out_features + layer.in_features)) - 1,
                   min(layer.out_features, layer.in_features))

    def factorize(self, layer: LayerInfo, weight: torch.Tensor,
                  stats: LayerStats | None) -> LowRankFactors:
        """Return the layer's full decomposition (activation-aware when `stats` are given)."""
        gram = None if stats is None else stats.gram
        counts = None if stats is None else stats.row_counts
        return decompose(weight.reshape(weight.shape[0], -1), gram, counts)

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
        factors = None if stats is None else stats.extras.get("lowrank")
        if factors is None and stats is not None:
            factors = self.factorize(layer, weight, stats)
        return LowRankWeight(layer.weight_shape, size, factors)

    def compact_module(self, layer: LayerInfo, parametrization: nn.Module,
                       theta: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> nn.Module:
        A, B = theta
        if layer.kind == "conv2d":
            return LowRankConv2d(layer, A, B, bias)
        if layer.kind == "embedding":
            return LowRankEmbedding(A, B)
        return LowRankLinear(A, B, bias)
