"""lowrank's modules: the parametrization W = (A @ B) reshaped, and the compact forms of
each layer kind (two matmuls, a kh×kw (or k-wide) conv with r filters then a 1×1 (width-1) conv,
a narrow table then a projection)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from compressor.methods.lowrank.factors import LowRankFactors, decompose
from compressor.runtime.layers import LayerInfo


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
        # Copies: θ must not share storage with the decomposition, which other copies reuse
        # (A made from W for a tall one is a new tensor already: a table-sized copy saved).
        A, B = factors.first(self.rank), factors.second(self.rank)
        return (A.to(weight.dtype, copy=factors.A is not None).contiguous(),
                B.to(weight.dtype, copy=True).contiguous())


class LowRankLinear(nn.Module):
    """Compute a Linear layer as two matmuls: x Bᵀ, then (·) Aᵀ + bias."""

    # The weight its first matmul applies to its input (`compressor.export.smoothing`).
    int8_input_weight = "B"

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.A = nn.Parameter(A.detach(), requires_grad=False)
        self.B = nn.Parameter(B.detach(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)



class TiedLowRankHead(nn.Module):
    """A tied LM head in compact form, (x Bᵀ) Aᵀ + bias, holding Aᵀ and Bᵀ (views of θ) as its
    matmuls take them, so that the input table's rows (`tied_embedding`) read the same two
    tensors and the export keeps each factor once (an A read by a Gather and by a MatMul
    would be stored twice: A, and the transpose the exporter folds for the MatMul)."""

    # Its factors are the input table's too: int8 smoothing must leave them alone.
    int8_input_weight = None

    def __init__(self, A: torch.Tensor, B: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.At = nn.Parameter(A.detach().t(), requires_grad=False)
        self.Bt = nn.Parameter(B.detach().t(), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.matmul(torch.matmul(x, self.Bt), self.At)
        return out if self.bias is None else out + self.bias

    def tied_embedding(self) -> TiedLowRankRows:
        """The input table's use of this weight: its rows, A[ids] @ B, from the same tensors."""
        return TiedLowRankRows(self)


class TiedLowRankRows(nn.Module):
    """The rows of a tied table, A[ids] @ B = (Bᵀ Aᵀ[:, ids])ᵀ, read from its head's Aᵀ and Bᵀ
    (the same parameters)."""

    def __init__(self, head: TiedLowRankHead) -> None:
        super().__init__()
        self.At, self.Bt = head.At, head.Bt

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        columns = torch.index_select(self.At, 1, ids.reshape(-1))  # (r, tokens)
        rows = torch.matmul(self.Bt, columns).transpose(0, 1)  # (tokens, dim)
        return rows.reshape(*ids.shape, self.Bt.shape[0])


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
        # Views of θ, not copies: training this module trains the student's θ
        # (`compressor.finetune.quantization_aware`).
        self.spatial = nn.Parameter(B.detach().view(rank, in_channels, kh, kw),
                                    requires_grad=False)
        self.pointwise = nn.Parameter(A.detach().view(out_channels, rank, 1, 1),
                                      requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x, self.spatial, None, self.stride, self.padding, self.dilation)
        return F.conv2d(h, self.pointwise, self.bias)


class LowRankConv1d(nn.Module):
    """Compute a Conv1d as a k-wide conv with r filters, then a width-1 conv to the outputs."""

    def __init__(self, layer: LayerInfo, A: torch.Tensor, B: torch.Tensor,
                 bias: torch.Tensor | None) -> None:
        super().__init__()
        out_channels, in_channels, width = layer.weight_shape
        rank = A.shape[1]
        # Views of θ, not copies: the module computes with the trained θ itself.
        self.spatial = nn.Parameter(B.detach().view(rank, in_channels, width),
                                    requires_grad=False)
        self.pointwise = nn.Parameter(A.detach().view(out_channels, rank, 1), requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.stride, self.padding, self.dilation = layer.stride, layer.padding, layer.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.conv1d(x, self.spatial, None, self.stride, self.padding, self.dilation)
        return F.conv1d(h, self.pointwise, self.bias)
