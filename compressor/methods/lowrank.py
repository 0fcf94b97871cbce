"""`lowrank`: W = A @ B with A (out × r) and B (r × in·kh·kw).

Initialization is a truncated SVD of W, or, given the layer's input statistics, the
activation-aware solution (SVD-LLM style): with the input Gram matrix G = X Xᵀ = L Lᵀ, the rank-r
product minimizing ‖(W − A B) X‖ is the truncated SVD of W L mapped back through L⁻¹. A Conv2d
factorizes into a kh×kw conv with r filters followed by a 1×1 conv.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from compressor.errors import ConfigError
from compressor.methods import register_method
from compressor.methods.base import LayerInfo, LayerStats, MethodSettings

# Relative damping added to the Gram diagonal so its Cholesky factor exists and is well-conditioned.
_GRAM_DAMPING = 1e-4


class LowRankWeight(nn.Module):
    """Parametrize a weight as (A @ B) reshaped to the layer's weight shape."""

    def __init__(self, weight_shape: tuple[int, ...], rank: int,
                 input_gram: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight_shape = tuple(weight_shape)
        self.rank = rank
        # Used once by right_inverse to initialize θ; not part of the state.
        self.input_gram = input_gram

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return (A @ B).reshape(self.weight_shape)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (A, B) of rank `rank` closest to `weight` (on the inputs, when a Gram is set)."""
        matrix = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
        if self.input_gram is None:
            A, B = _truncated_svd(matrix, self.rank)
        else:
            A, B = _activation_aware_svd(matrix, self.input_gram, self.rank)
        return A.to(weight.dtype).contiguous(), B.to(weight.dtype).contiguous()


def _truncated_svd(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    U, S, Vh = torch.linalg.svd(matrix, full_matrices=False)
    root = S[:rank].sqrt()
    return U[:, :rank] * root, root[:, None] * Vh[:rank]


def _activation_aware_svd(
    matrix: torch.Tensor, gram: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor]:
    gram = gram.to(torch.float64)
    eye = torch.eye(gram.shape[0], dtype=torch.float64)
    damping = _GRAM_DAMPING * gram.diagonal().mean().clamp(min=1e-12)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(gram + damping * eye)
        if int(info) == 0:
            break
        damping *= 10
    else:
        return _truncated_svd(matrix, rank)
    A, BL = _truncated_svd(matrix @ chol, rank)
    # B = (BL) L⁻¹, solved rather than inverted: Lᵀ Bᵀ = BLᵀ.
    B = torch.linalg.solve_triangular(chol.T, BL.T, upper=True).T
    return A, B


class LowRankLinear(nn.Module):
    """Compute a Linear layer as two matmuls: x Bᵀ, then (·) Aᵀ + bias."""

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.A = nn.Parameter(A.detach().clone(), requires_grad=False)
        self.B = nn.Parameter(B.detach().clone(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)


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
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.spatial, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.pointwise, self.bias)


@register_method
class LowRank:
    """W = A @ B: `rank` numbers per output plus `rank` per input."""

    name = "lowrank"
    layer_kinds = frozenset({"linear", "conv2d"})
    size_field = "rank"
    min_size = 1
    ties_output_rows = False

    def compact_numel(self, layer: LayerInfo, size: int, settings: MethodSettings) -> float:
        return float(size * (layer.out_features + layer.in_features))

    def size_for_budget(self, layer: LayerInfo, budget: float,
                        settings: MethodSettings) -> int | None:
        rank = min(math.floor(budget / (layer.out_features + layer.in_features)),
                   min(layer.out_features, layer.in_features))
        if rank < 1 or self.compact_numel(layer, rank, settings) >= layer.numel:
            return None
        return rank

    def parametrization(self, layer: LayerInfo, weight: torch.Tensor, size: int,
                        stats: LayerStats | None, settings: MethodSettings) -> nn.Module:
        full_rank = min(layer.out_features, layer.in_features)
        if not 1 <= size <= full_rank:
            raise ConfigError(
                f"rank {size} is out of range for layer {layer.name!r}: its weight is "
                f"{layer.out_features}×{layer.in_features}, so the rank must be 1..{full_rank}; "
                "fix the override")
        # A and B are not copies of one another: grad_reduction has nothing to reduce here.
        gram = None if stats is None else stats.gram
        return LowRankWeight(layer.weight_shape, size, input_gram=gram)

    def compact_module(self, layer: LayerInfo, parametrization: nn.Module,
                       theta: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> nn.Module:
        A, B = theta
        if layer.kind == "conv2d":
            return LowRankConv2d(layer, A, B, bias)
        return LowRankLinear(A, B, bias)
