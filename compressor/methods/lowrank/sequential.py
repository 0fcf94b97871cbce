"""lowrank's sequential correction: re-solve B with A fixed on the compressed model's inputs.

Activation-aware initialization fits every layer to the inputs the ORIGINAL model feeds it; in
the compressed model a layer's inputs come from the already compressed layers before it. With
A fixed, the closed-form least squares update of SVD-LLM,

    B = argmin ‖W X − A B X'‖  =  (AᵀA)⁻¹ Aᵀ W C (G' + λI)⁻¹,   C = X X'ᵀ, G' = X' X'ᵀ

(X: the original's inputs to the layer, X': the compressed model's), makes each layer absorb
the error of the layers upstream. `compressor.rewrite.sequential` runs the two models side by
side and hands each layer its input moments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.runtime.layers import InputMoments

# Relative damping of G' before it is solved against.
_DAMPING = 1e-3
# Rows of a layer's weight (and of A) taken to float64 at a time.
_ROWS_PER_CHUNK = 4096


@dataclass
class _LayerFit:
    """What the least-squares fit of B needs of a layer with A fixed, reduced to rank-sized
    matrices: AᵀA (r × r), AᵀW (r × in) and, per set of moments, AᵀW C (r × in) and
    ‖X Wᵀ‖² (float64). With them,

        ‖X' (A B)ᵀ − X Wᵀ‖² = ⟨AᵀA, B G' Bᵀ⟩ − 2 ⟨AᵀW C, B⟩ + ‖X Wᵀ‖²

    and the best B is (AᵀA)⁻¹ AᵀW C (G' + λI)⁻¹: no output-sized (out × in) float64 matrix is
    formed, only chunks of `_ROWS_PER_CHUNK` rows of W and A (a vocabulary-wide output layer's
    W alone is 200 MB in float64)."""

    gram_a: torch.Tensor
    a_w: torch.Tensor
    W: torch.Tensor

    @classmethod
    def of(cls, A: torch.Tensor, W: torch.Tensor) -> _LayerFit:
        rank = A.shape[1]
        gram_a = torch.zeros(rank, rank, dtype=torch.float64)
        a_w = torch.zeros(rank, W.shape[1], dtype=torch.float64)
        for start in range(0, W.shape[0], _ROWS_PER_CHUNK):
            a = A[start:start + _ROWS_PER_CHUNK].double()
            gram_a += a.T @ a
            a_w += a.T @ W[start:start + _ROWS_PER_CHUNK].double()
        return cls(gram_a, a_w, W)

    def reference(self, moments: InputMoments) -> torch.Tensor:
        """Return ‖X Wᵀ‖²: the original's squared outputs on these inputs."""
        total = torch.zeros((), dtype=torch.float64)
        for start in range(0, self.W.shape[0], _ROWS_PER_CHUNK):
            w = self.W[start:start + _ROWS_PER_CHUNK].double()
            total += ((w @ moments.gram) * w).sum()
        return total

    def squared_error(self, B: torch.Tensor, moments: InputMoments,
                      reference: torch.Tensor | None = None) -> torch.Tensor:
        """Return ‖X' (A B)ᵀ − X Wᵀ‖² (the layer's output error on the compressed model's
        inputs against the original's outputs); without the constant ‖X Wᵀ‖² when
        `reference` is not given (differences between two B are then still exact)."""
        B = B.double()
        error = ((self.gram_a * (B @ moments.student_gram @ B.T)).sum()
                 - 2 * ((self.a_w @ moments.cross) * B).sum())
        return error if reference is None else error + reference

    def best_second_factor(self, moments: InputMoments) -> torch.Tensor:
        """Return B = (AᵀA)⁻¹ AᵀW C (G' + λI)⁻¹ (see the module docstring), in float64."""
        gram = moments.student_gram
        eye = torch.eye(gram.shape[0], dtype=torch.float64)
        damped = gram + _DAMPING * gram.diagonal().mean().clamp(min=1e-12) * eye
        target = self.a_w @ moments.cross
        right = torch.linalg.solve(damped, target.T).T  # AᵀW C G'⁻¹, G' symmetric
        return torch.linalg.lstsq(self.gram_a, right).solution


def correct_second_factor_(A: torch.Tensor, B: torch.Tensor, W: torch.Tensor,
                           moments: InputMoments, check: InputMoments | None = None) -> float:
    """Re-solve B (in place) on `moments` unless that fits worse; return the output error
    after / before. `W` is the original's weight as an (out × in) matrix.

    With `check`, "worse" is judged on those inputs, which the refit was not made on (a refit
    on few rows can fit them exactly and every other row worse), the refit kept is made again
    on `moments` and `check` together, and the errors returned are `check`'s."""
    fit = _LayerFit.of(A.detach(), W)
    judge = moments if check is None else check
    reference = fit.reference(judge)
    before = fit.squared_error(B, judge, reference).clamp(min=0).sqrt()
    corrected = fit.best_second_factor(moments)
    after = fit.squared_error(corrected, judge, reference).clamp(min=0).sqrt()
    if after < before:  # a worse fit (e.g. too few rows) keeps the old B
        if check is not None:
            both = InputMoments(moments.gram + check.gram, moments.cross + check.cross,
                                moments.student_gram + check.student_gram)
            corrected = fit.best_second_factor(both)
        B.copy_(corrected.to(B.dtype))
    return float(min(after, before) / before.clamp(min=1e-30))
