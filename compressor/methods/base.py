"""What every compression method provides, and the layer facts it is given.

A method is one module: a `Method` subclass registered with `@register_method`, declaring its
options model (`Options`: its name, its size field, its own settings), the layer kinds it applies
to, whether it needs input statistics, and offering
- a *parametrization* (`torch.nn.utils.parametrize`): an `nn.Module` whose `forward(*theta)`
  returns the full weight W and whose `right_inverse(W)` returns the initial θ (a tuple, so the
  tensors are stored as `original0`, `original1`, ...). At full size `forward(right_inverse(W))`
  equals W;
- a *compact module* for `export.form = "factorized"`: computes the layer's output from its
  input with θ directly (two matmuls, a Gather over a codebook, ...), never materializing W;
- its size arithmetic, so one global `ratio` budget can be turned into per-layer sizes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

LayerKind = Literal["linear", "conv2d", "embedding"]
GradReduction = Literal["sum", "mean"]


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer of the program: a Linear, Conv2d or Embedding weight and its use.

    An embedding table (rows, dim) is seen as a matrix of `rows` outputs by `dim` inputs, so
    `A @ B` is a narrow table A (rows × r) times a projection B (r × dim).
    """

    name: str  # dotted module name, e.g. "encoder.0.dense"; the weight is f"{name}.weight"
    kind: LayerKind
    weight_shape: tuple[int, ...]  # (out, in), (out, in, kh, kw) or (rows, dim)
    has_bias: bool
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    produces_output: bool = False  # its result is one of the model's outputs, as is

    @property
    def out_features(self) -> int:
        """Rows of W: output features, or output channels of a conv."""
        return self.weight_shape[0]

    @property
    def in_features(self) -> int:
        """Columns of W seen as a matrix: `in`, or `in * kh * kw` for a conv."""
        return math.prod(self.weight_shape[1:])

    @property
    def kernel_size(self) -> tuple[int, int]:
        """(kh, kw) of a conv; (1, 1) for a Linear."""
        return tuple(self.weight_shape[2:]) if self.kind == "conv2d" else (1, 1)  # type: ignore[return-value]

    @property
    def numel(self) -> int:
        """Numbers in the dense weight."""
        return math.prod(self.weight_shape)


@dataclass
class LayerStats:
    """Calibration statistics of a layer's input, for activation-aware initialization.

    `gram` is the sum over calibration rows x (in_features each; unfolded patches for a conv)
    of x xᵀ, in float64; `rows` is how many rows were summed. An embedding has no Gram but
    `row_counts`: how many times each of its rows was read.
    """

    gram: torch.Tensor | None
    rows: int = 0
    row_counts: torch.Tensor | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


class MethodOptions(BaseModel):
    """A method's own options: what the config's `method` (or an override's) holds.

    Each method subclasses this with `name: Literal["<its name>"]`, its size field (None: sized
    from the budget) and its own settings; the config's method choice is the union of every
    registered method's options, told apart by `name`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str


class Method:
    """The contract of a compression method (see the module docstring).

    An instance is the method configured by its options: `method.options` holds them, and the
    plan keeps one instance per configured method.
    """

    name: ClassVar[str]
    Options: ClassVar[type[MethodOptions]]
    layer_kinds: ClassVar[frozenset[str]]
    # The options field that sets this method's size ("rank", "groups", "values"), or None
    # when the method has a fixed size (tie_inputs).
    size_field: ClassVar[str | None]
    # The smallest valid size (what the planner falls back to when a budget is too tight).
    min_size: ClassVar[int]
    # Whether it makes whole output rows equal (or proportional): on a layer that produces a
    # model output, such as a classifier head, that would make some outputs identical.
    ties_output_rows: ClassVar[bool]

    def __init__(self, options: MethodOptions | None = None) -> None:
        self.options = self.Options() if options is None else options
        if self.options.name != self.name:
            raise ValueError(f"{type(self).__name__} got options of method {self.options.name!r}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options!r})"

    @property
    def fixed_size(self) -> int | None:
        """The size the options set explicitly (every layer gets it), or None: from the budget."""
        return None if self.size_field is None else getattr(self.options, self.size_field)

    @property
    def needs_input_stats(self) -> bool:
        """Whether `parametrization` uses the layer's calibration statistics (`LayerStats`)."""
        return False

    @property
    def corrects_sequentially(self) -> bool:
        """Whether the layer's θ is re-solved on the compressed model's own inputs after
        initialization (see `compressor.sequential`)."""
        return False

    def compact_numel(self, layer: LayerInfo, size: int) -> float:
        """Return the storage of θ at `size`, counted in float32 numbers (index bits included)."""
        raise NotImplementedError

    def size_for_budget(self, layer: LayerInfo, budget: float) -> int | None:
        """Return the largest size whose `compact_numel` fits in `budget` numbers.

        None when no size fits or the method would save nothing on this layer.
        """
        raise NotImplementedError

    def parametrization(self, layer: LayerInfo, weight: torch.Tensor, size: int,
                        stats: LayerStats | None, grad_reduction: GradReduction = "sum",
                        ) -> nn.Module:
        """Return the parametrization W = f(θ) for this layer (structure chosen from `weight`).

        `grad_reduction`: a tied θ entry's gradient is the sum ("sum") or the mean of its copies'.
        """
        raise NotImplementedError

    def compact_module(self, layer: LayerInfo, parametrization: nn.Module,
                       theta: tuple[torch.Tensor, ...], bias: torch.Tensor | None) -> nn.Module:
        """Return a module computing the layer's output from its input with θ directly.

        `theta` holds the trained tensors in `right_inverse` order (original0, original1, ...).
        """
        raise NotImplementedError


def damped_cholesky(gram: torch.Tensor, damping: float) -> torch.Tensor | None:
    """Return the Cholesky factor L of G + δI (float64, on G's device), G = L Lᵀ.

    δ starts at `damping` × the mean of G's diagonal and grows tenfold until the factor exists
    (at most six tries); None when it never does.
    """
    gram = gram.to(torch.float64)
    eye = torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    delta = damping * gram.diagonal().mean().clamp(min=1e-12)
    for _ in range(6):
        chol, info = torch.linalg.cholesky_ex(gram + delta * eye)
        if int(info) == 0:
            return chol
        delta *= 10
    return None


def int_bits(count: int) -> int:
    """Return the bits of the smallest unsigned integer dtype (8, 16, 32) that indexes `count`."""
    for bits in (8, 16, 32):
        if count <= 2**bits:
            return bits
    return 64
