"""A layer's full decomposition W = A @ B, activation-aware when the layer's inputs are known.

Initialization is a truncated SVD of W, or, given the layer's input statistics, the
activation-aware solution (SVD-LLM style): with the input Gram matrix G = X Xᵀ = L Lᵀ, the rank-r
product minimizing ‖(W − A B) X‖ is the truncated SVD of W L mapped back through L⁻¹. An
embedding table weighs each row by how often the calibration data reads it (rows never read
keep a floor weight, so unseen tokens stay usable). One decomposition serves every rank: its
squared singular values are the output error each dropped direction costs, which is what the
sensitivity allocation reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from compressor.methods.base import damped_cholesky

# Relative damping added to the Gram diagonal so its Cholesky factor exists and is well-conditioned.
_GRAM_DAMPING = 1e-4
# An embedding row read n times weighs n / (mean reads per row) + this: rows never read count too.
_UNSEEN_ROW_WEIGHT = 1.0
# Rows of W taken to float64 at a time when B is made again from it.
_ROWS_PER_CHUNK = 4096


@dataclass
class LowRankFactors:
    """A full decomposition W = A @ B, directions sorted by the output error they carry.

    `A[:, :r] @ B[:r]` (`product(r)`) is the best rank-r product (in the metric of the inputs it
    was given), and `energy[r:].sum()` its squared output error on the calibration inputs (on W
    itself without them).

    Only the smaller factor is kept; the other is made from W itself (`weight`, the original's
    tensor, shared) when it is asked for. With A = U √S from the SVD of W L (L the whitening, or
    the identity) and B = √S Vᵀ L⁻¹:
    - a wide W keeps A: B = S⁻¹ Aᵀ W, whatever L was (`second`; a down projection's B is 2.75
      times its A);
    - a tall W (a vocabulary table or head, an up projection) keeps B and `weight_to_A`,
      L V S^{-1/2} (in × k): A = W L V S^{-1/2} (`first`), with row weights too. Gemma-3's tied
      262,144 × 640 table then holds two 640 × 640 matrices between calibration and
      initialization, not a 671 MB A.
    An embedding whose W is wide keeps A and B (its B comes from row-weighted W).
    """

    A: torch.Tensor | None  # (out, k); None: made from `weight` (see `first`)
    B: torch.Tensor | None  # (k, in); None: made from `weight` (see `second`)
    energy: torch.Tensor  # (k,) float64, decreasing
    weight: torch.Tensor | None = None  # (out, in): W, where B = S⁻¹ Aᵀ W or A = W weight_to_A
    weight_to_A: torch.Tensor | None = None  # (in, k) float64: A = W @ weight_to_A, for a tall W

    @property
    def kept_rank(self) -> int:
        """How many directions the factors hold (the largest rank `first`/`second` give)."""
        return (self.A if self.A is not None else self.weight_to_A).shape[1]

    def error(self, rank: int) -> float:
        """Return the squared output error of the rank-`rank` truncation."""
        return float(self.energy[rank:].sum())

    def first(self, rank: int) -> torch.Tensor:
        """Return A's first `rank` columns (made from W in float64, a chunk of rows at a time,
        when A is not kept: a new tensor)."""
        if self.A is not None:
            return self.A[:, :rank]
        rows = self.weight.shape[0]
        A = torch.empty(rows, rank, dtype=torch.float32, device=self.weight.device)
        to_a = self.weight_to_A[:, :rank]
        for start in range(0, rows, _ROWS_PER_CHUNK):
            A[start:start + _ROWS_PER_CHUNK] = (
                self.weight[start:start + _ROWS_PER_CHUNK].double() @ to_a)
        return A

    def second(self, rank: int) -> torch.Tensor:
        """Return B's first `rank` rows (made from W in float64, a chunk of rows at a time,
        when B is not kept)."""
        if self.B is not None:
            return self.B[:rank]
        singular = self.energy[:rank].sqrt().clamp(min=float(self.energy[0].sqrt()) * 1e-15
                                                   + 1e-300)
        B = torch.zeros(rank, self.weight.shape[1], dtype=torch.float64, device=self.weight.device)
        for start in range(0, self.weight.shape[0], _ROWS_PER_CHUNK):
            a = self.A[start:start + _ROWS_PER_CHUNK, :rank].double()
            B += a.T @ self.weight[start:start + _ROWS_PER_CHUNK].double()
        return (B / singular[:, None]).to(self.A.dtype)

    def product(self, rank: int) -> torch.Tensor:
        """Return the best rank-`rank` product A[:, :rank] @ B[:rank] (float32; for a tall W,
        W @ (weight_to_A[:, :rank] @ B[:rank]), A never made whole)."""
        if self.A is None:
            projection = self.weight_to_A[:, :rank] @ self.B[:rank].double()
            return self.weight.float() @ projection.float()
        return self.first(rank) @ self.second(rank)

    def truncated(self, rank: int) -> LowRankFactors:
        """Return the factors kept up to `rank` (own copies; every energy is kept, so `error`
        still prices every rank). B is dropped where it can be made again from W."""
        if self.A is None:  # a tall W: B and weight_to_A, both small
            if rank >= self.kept_rank:
                return self
            return LowRankFactors(None, self.B[:rank].clone(), self.energy, self.weight,
                                  self.weight_to_A[:, :rank].clone())
        keep_b = self.weight is None
        if rank >= self.A.shape[1] and (keep_b or self.B is None):
            return self
        rank = min(rank, self.A.shape[1])
        return LowRankFactors(self.A[:, :rank].clone(),
                              self.B[:rank].clone() if keep_b else None, self.energy,
                              self.weight)


def _svd_factors(matrix: torch.Tensor) -> LowRankFactors:
    """Return the SVD of a float64 `matrix` no taller than wide as factors A = U √S, B = √S Vᵀ,
    energies S².

    Through the eigendecomposition of M Mᵀ: 3-5× faster than `torch.linalg.svd` on the layers of
    a billion-parameter model (a 2048×5632 weight: 2.5 s against 11.5 s on 2 cores). In float64
    the squared condition number costs nothing the truncation keeps: a direction loses precision
    only where S² falls below ~1e-16 of the largest, and such a direction carries no energy.
    A B equals M whatever the spectrum (A's columns are orthogonal directions of M, B is M
    projected on them). A taller matrix goes through `_tall_factors`.
    """
    energy, vectors = torch.linalg.eigh(matrix @ matrix.T)
    energy, vectors = energy.flip(0).clamp(min=0), vectors.flip(1)  # decreasing
    # √S, floored so that a direction of no energy divides by a tiny number, not by zero.
    root = energy.clamp(min=float(energy[0]) * 1e-30 + 1e-300).pow(0.25)
    # vectors = U: B = √S Vᵀ = Uᵀ M / √S
    return LowRankFactors(vectors * root, (vectors.T @ matrix) / root[:, None], energy)


def decompose(matrix: torch.Tensor, gram: torch.Tensor | None,
              row_counts: torch.Tensor | None) -> LowRankFactors:
    """Return the full decomposition of `matrix` (out × in) that truncates best on the inputs.

    With an input Gram G = L Lᵀ: the SVD of W L, mapped back through L⁻¹. With row read counts
    (an embedding): the SVD of D W with D the row weights, mapped back through D⁻¹. Neither:
    the plain SVD. Factors come back in float32, the energies in float64.

    A tall W (more rows than columns: a vocabulary table or head, an up projection) is taken
    to float64 a chunk of rows at a time (`_tall_factors`): a 262,144-row table is 1.3 GB in
    float64, and the whole-matrix route held three such copies at once. Its A is not made
    here (see `LowRankFactors`).
    """
    original = matrix.detach()
    chol = None if gram is None else damped_cholesky(gram, _GRAM_DAMPING)
    row_weight = None
    if chol is None and row_counts is not None:
        counts = row_counts.to(torch.float64)
        row_weight = (counts / counts.mean().clamp(min=1e-12) + _UNSEEN_ROW_WEIGHT).sqrt()
    tall = original.shape[0] > original.shape[1]
    if tall:
        weight_to_A, B, energy = _tall_factors(original, chol, row_weight)
    else:
        matrix = original.to(torch.float64)
        if chol is not None:
            matrix = matrix @ chol
        elif row_weight is not None:
            matrix = matrix * row_weight[:, None]
        factors = _svd_factors(matrix)
        A, B, energy = factors.A, factors.B, factors.energy
        if row_weight is not None:
            A = A / row_weight[:, None]
    if chol is not None:  # B = (B L) L⁻¹, solved rather than inverted: Lᵀ Bᵀ = (B L)ᵀ.
        B = torch.linalg.solve_triangular(chol.T, B.T, upper=True).T
    if tall:
        return LowRankFactors(None, B.float(), energy, original, weight_to_A)
    return LowRankFactors(A.float(), B.float(), energy,
                          None if row_counts is not None else original)


def _tall_factors(weight: torch.Tensor, chol: torch.Tensor | None,
                  row_weight: torch.Tensor | None,
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return `weight_to_A` (float64), B and the energies of the SVD of M = D W L (D the row
    weights, L the whitening; either may be absent) for a W with more rows than columns, as
    `_svd_factors` gives them (A = D⁻¹ M V / √S = W L V / √S, B = √S Vᵀ, from the
    eigendecomposition of MᵀM), with M made in float64 a chunk of `_ROWS_PER_CHUNK` rows at a
    time: A is not made (`LowRankFactors.first` makes it from W)."""
    rows, cols = weight.shape
    gram = torch.zeros(cols, cols, dtype=torch.float64, device=weight.device)
    for start in range(0, rows, _ROWS_PER_CHUNK):
        m = weight[start:start + _ROWS_PER_CHUNK].double()
        if chol is not None:
            m = m @ chol
        if row_weight is not None:
            m = m * row_weight[start:start + _ROWS_PER_CHUNK, None]
        gram += m.T @ m
    energy, vectors = torch.linalg.eigh(gram)
    energy, vectors = energy.flip(0).clamp(min=0), vectors.flip(1)  # decreasing
    root = energy.clamp(min=float(energy[0]) * 1e-30 + 1e-300).pow(0.25)  # as `_svd_factors`
    weight_to_A = (vectors if chol is None else chol @ vectors) / root
    return weight_to_A, root[:, None] * vectors.T, energy
