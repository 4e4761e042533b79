"""Low-rank factorization: the rank formula and the shared ``SVD(W S)`` math.

Notation follows METHODS.md: a linear computes ``y = W x`` with ``W`` of shape
``m x n`` (out x in). A method chooses a right transform ``S`` (identity for
vanilla SVD, a diagonal for ASVD/FWSVD, a Cholesky factor for SVD-LLM, ...);
``SVD(W S) = U Sigma V^T`` and the rank-``r`` factors are
``W_u = U_r Sigma_r^(1/2)`` and ``W_v = Sigma_r^(1/2) V_r^T S^(-1)``.
Truncation is the last step, so one decomposition serves every ratio.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def rank_for_ratio(m: int, n: int, ratio: float) -> int:
    """Rank that removes ``ratio`` of an ``m x n`` matrix's parameters.

    ``r = floor(m*n*(1-ratio)/(m+n))``, at least 1 (the SVD-LLM code's
    definition). Callers keep the layer dense when ``r*(m+n) >= m*n``.
    """
    return rank_for_size(m * n, m + n, ratio)


def rank_for_size(dense: int, per_rank: int, ratio: float) -> int:
    """:func:`rank_for_ratio` for a matrix of ``dense`` parameters whose factors hold ``per_rank`` per rank."""
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio must be in [0, 1), got {ratio}")
    return max(1, math.floor(dense * (1.0 - ratio) / per_rank))


def is_worth_factorizing(m: int, n: int, rank: int) -> bool:
    """Whether two factors of this rank hold fewer parameters than ``W``."""
    return rank * (m + n) < m * n


class RightTransform:
    """The ``S`` of ``SVD(W S)``: how a method weights the input channels."""

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        """Return ``W S``."""
        raise NotImplementedError

    def solve(self, vt: torch.Tensor) -> torch.Tensor:
        """Return ``Vt S^(-1)`` (computed with a solve, not an inverse)."""
        raise NotImplementedError


class Identity(RightTransform):
    """``S = I``: vanilla SVD."""

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def solve(self, vt: torch.Tensor) -> torch.Tensor:
        return vt


@dataclass
class Diagonal(RightTransform):
    """``S = diag(scale)``: per-input-channel scaling (ASVD, FWSVD)."""

    scale: torch.Tensor

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.scale.to(weight)[None, :]

    def solve(self, vt: torch.Tensor) -> torch.Tensor:
        return vt / self.scale.to(vt)[None, :]


@dataclass
class LowerTriangular(RightTransform):
    """``S = L`` lower triangular (Cholesky whitening of SVD-LLM)."""

    factor: torch.Tensor

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return weight @ self.factor.to(weight)

    def solve(self, vt: torch.Tensor) -> torch.Tensor:
        # X L = Vt  <=>  L^T X^T = Vt^T
        lt = self.factor.to(vt).T
        return torch.linalg.solve_triangular(lt, vt.T, upper=True).T


@dataclass
class Eigen(RightTransform):
    """``S = U_s Lambda^(1/2)`` from ``G = U_s Lambda U_s^T`` (SVD-LLM V2).

    ``S^(-1) = Lambda^(-1/2) U_s^T``; callers damp ``Lambda`` beforehand so
    every eigenvalue is positive.
    """

    vectors: torch.Tensor
    values: torch.Tensor

    def apply(self, weight: torch.Tensor) -> torch.Tensor:
        return (weight @ self.vectors.to(weight)) * self.values.to(weight).sqrt()[None, :]

    def solve(self, vt: torch.Tensor) -> torch.Tensor:
        return (vt / self.values.to(vt).sqrt()[None, :]) @ self.vectors.to(vt).T


@dataclass
class Factorization:
    """A ratio-independent decomposition of one matrix, truncated on demand.

    ``u`` is ``m x k``, ``s`` holds the ``k`` singular values of ``W S`` in
    descending order and ``vt`` is ``k x n`` with ``S^(-1)`` already applied,
    so ``W ~= u[:, :r] diag(s[:r]) vt[:r]`` at every rank ``r``. ``facts``
    holds what the method found on the way (e.g. the Cholesky shift a gram
    needed); the harness records it with the compression. ``scores``
    (optional, one float64 value per singular value, stored in full like
    ``s``) is what a method computed per component for its allocator, e.g.
    ZS-SVD's first-order loss estimates, which need the components beyond
    the useful rank that the store does not keep.
    """

    u: torch.Tensor
    s: torch.Tensor
    vt: torch.Tensor
    facts: dict = field(default_factory=dict)
    scores: torch.Tensor | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return self.u.shape[0], self.vt.shape[1]

    def factors(self, rank: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W_u, W_v)`` at ``rank``, each carrying ``Sigma^(1/2)``."""
        root = self.s[:rank].sqrt()
        w_u = self.u[:, :rank] * root[None, :]
        w_v = root[:, None] * self.vt[:rank]
        return w_u.to(dtype).contiguous(), w_v.to(dtype).contiguous()

    def truncation_loss(self, rank: int) -> float:
        """Sum of the squared singular values dropped at ``rank``."""
        return float((self.s[rank:].double() ** 2).sum())

    def normalized_loss(self, rank: int) -> float:
        """``sqrt(truncated energy / total energy)`` of the spectrum, in [0, 1]."""
        total = float((self.s.double() ** 2).sum())
        return math.sqrt(self.truncation_loss(rank) / total) if total > 0 else 0.0


def factorize(weight: torch.Tensor, transform: RightTransform | None = None) -> Factorization:
    """Exact float64 SVD of ``W S``, returned as a :class:`Factorization`.

    Only ``W S`` is held during the SVD (not also the float64 copy of ``W``):
    the SVD's own workspace is the largest transient of a decomposition.
    """
    transform = transform or Identity()
    weighted = transform.apply(weight.detach().to(torch.float64))
    u, s, vt = torch.linalg.svd(weighted, full_matrices=False)
    del weighted
    vt = transform.solve(vt)
    for name, t in (("U", u), ("singular values", s), ("V^T S^-1", vt)):
        if not torch.isfinite(t).all():
            raise FloatingPointError(f"non-finite {name} in the SVD of a {tuple(weight.shape)} matrix "
                                     f"({type(transform).__name__} transform)")
    return Factorization(u=u, s=s, vt=vt)


def cholesky_whitening(gram: torch.Tensor, epsilon: float = 1e-6) -> tuple[LowerTriangular, float]:
    """``S = cholesky(G)`` (SVD-LLM). Returns the transform and the shift used.

    When ``G`` is not positive definite the reference adds
    ``(-lambda_min + epsilon) I`` (``1e-6``; Basis Sharing's code: ``7e-6``) and retries; the shift is returned
    so callers can log which layer needed it (0.0 when none was needed).
    """
    g = gram.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(g)
    if int(info) == 0:
        return LowerTriangular(factor), 0.0
    del factor  # n x n of no use: free it before the eigenvalues' workspace
    shift = float(-torch.linalg.eigvalsh(g).min()) + epsilon
    shifted = g.clone()
    shifted.diagonal().add_(shift)  # G + shift I without an n x n identity (same values, bit for bit)
    factor, info = torch.linalg.cholesky_ex(shifted)
    del shifted
    if int(info) != 0:
        raise FloatingPointError(f"Cholesky failed even after shifting the gram by {shift:.3g}")
    return LowerTriangular(factor), shift


def eigen_whitening(gram: torch.Tensor, delta: float = 0.0) -> Eigen:
    """``S = U_s (Lambda + delta*mean(Lambda))^(1/2)`` from ``eigh(G)`` (SVD-LLM V2).

    Never fails on a singular ``G``: eigenvalues are clamped at zero and damped
    by ``delta * mean(Lambda)``. With ``delta = 0`` eigenvalues at or below a
    tolerance (``max(Lambda) * n * eps``) are raised to that tolerance: ``S``
    stays invertible, so the truncated ``W' = U_r U_r^T W`` keeps ``W`` on
    input directions the calibration data never visited. That is the opposite
    of a pseudo-inverse, which would drop those directions (zero ``W`` there).
    """
    values, vectors = torch.linalg.eigh(gram.to(torch.float64))
    values = values.clamp_min(0)
    tolerance = float(values.max()) * values.shape[0] * torch.finfo(torch.float64).eps
    values = values + delta * float(values.mean()) if delta > 0 else values.clamp_min(max(tolerance, 1e-300))
    return Eigen(vectors=vectors, values=values)
