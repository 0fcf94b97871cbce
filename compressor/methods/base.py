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
- its size arithmetic, so one global `ratio` budget can be turned into per-layer sizes;
- optional hooks the stages call without naming the method: `prepare` (what calibration keeps
  of a layer for the allocation and the initialization: an `Approximation` pricing every size
  lets the sensitivity allocation spread the budget), with `kept_tensors` / `from_kept_tensors`
  (that product as tensors, kept for a retried job), `correct_` (the sequential correction of
  θ on the compressed model's own inputs).
"""

from __future__ import annotations

from typing import ClassVar, Literal, Protocol

import torch
from pydantic import BaseModel, ConfigDict
from torch import nn

from compressor.runtime.layers import InputMoments, LayerInfo, LayerStats

GradReduction = Literal["sum", "mean"]


class Approximation(Protocol):
    """What a method prepares of a layer when every size has a price: the allocation reads it."""

    def error(self, size: int) -> float:
        """Return the squared output error of the layer at `size` (on the calibration inputs)."""

    def product(self, size: int) -> torch.Tensor:
        """Return the layer's weight at `size`, as an (out × in) matrix: a new tensor the
        caller owns (it may write to it)."""


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
        initialization (`correct_`, driven by `compressor.rewrite.sequential`)."""
        return False

    # Sizes the sensitivity allocation buys at a time (ranks stay multiples of it).
    size_step: ClassVar[int] = 1

    @property
    def prepares(self) -> bool:
        """Whether `prepare` makes something of a layer during calibration."""
        return False

    def prepare(self, layer: LayerInfo, weight: torch.Tensor, stats: LayerStats | None,
                size: int | None) -> Approximation | None:
        """Return what the allocation and the initialization reuse of this layer (kept in
        `LayerStats.prepared`), made once during calibration from its weight and, when
        `needs_input_stats`, its statistics; `size` is the planned one. An `Approximation`
        prices every size, which lets the sensitivity allocation move this layer's size."""
        return None

    def kept_tensors(self, prepared: Approximation) -> dict[str, torch.Tensor] | None:
        """Return the tensors `prepared` (what `prepare` made) is rebuilt from by
        `from_kept_tensors`, so a retried job keeps it instead of preparing it again; None:
        it is not kept."""
        return None

    def from_kept_tensors(self, layer: LayerInfo, weight: torch.Tensor,
                          tensors: dict[str, torch.Tensor]) -> Approximation:
        """Return what `prepare` made, from the tensors `kept_tensors` gave and the layer's
        `weight`. Raises `ValueError` when the tensors do not fit the layer."""
        raise NotImplementedError

    def break_even_size(self, layer: LayerInfo) -> int:
        """Return the largest size that stores fewer numbers than the dense weight."""
        raise NotImplementedError

    def correct_(self, layer: LayerInfo, theta: tuple[torch.Tensor, ...], weight: torch.Tensor,
                 moments: InputMoments, check: InputMoments | None = None) -> float:
        """Re-solve θ in place so that the layer fits the original's outputs on the
        compressed model's inputs (`moments`); return the output error after / before.
        `weight` is the original's, as an (out × in) matrix. With `check` (the moments of
        inputs it is not fitted on), the refit is kept only when it fits those better, and
        is then made on both; the errors returned are `check`'s."""
        raise NotImplementedError

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
