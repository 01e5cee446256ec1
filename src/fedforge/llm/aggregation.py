"""The math of federated LoRA aggregation, per adapted matrix, as pure NumPy functions.

Client ``k`` trained factors ``A_k`` (``r_k x d_in``) and ``B_k`` (``d_out x r_k``) with scale
``s_k``; its model is ``W0 + s_k B_k A_k``. Federated averaging of the clients' models asks for
the weighted mean of the *updates*, ``M = sum_k w_k s_k B_k A_k / sum_k w_k``. The modes:

- :func:`fedit` averages ``A`` and ``B`` separately (FedIT, the common baseline). Its update
  ``s mean(B) mean(A)`` is not ``M``: the cross terms ``B_j A_k`` (``j != k``) leak in. Inexact.
- :func:`ffa` freezes ``A`` at its shared initialization and averages ``B`` (FFA-LoRA,
  Sun et al. 2024): ``s mean(B_k) A = mean(s B_k A)``. Exact, with half the uplink.
- :func:`exact` forms ``M``, keeps its best rank-``r`` approximation (truncated SVD) as the new
  factors and returns the residual rank ``r`` cannot hold, to be folded into the frozen base
  (FedEx-LoRA's idea, Singhal et al. 2025): base + adapter then equal ``W0 + M`` exactly.
- :func:`hetero` forms ``M`` from clients of different ranks and projects it back to each
  client's rank by truncated SVD (HLoRA / FLoRA family); by Eckart-Young the projection error
  is the norm of ``M``'s singular values beyond that rank, the least any rank-``r`` matrix has.
- :func:`fedsa` averages only ``A``; each client keeps its ``B`` (FedSA-LoRA, Guo et al. 2025).

``M`` is never formed densely: it is ``L @ R`` with ``L = [w_1 s_1 B_1, ...]`` and
``R = [A_1; ...]`` of inner size ``sum r_k``, and :func:`low_rank_svd` takes its SVD through
two thin QR factorizations, ``O((d_in + d_out) K^2)`` for ``K = sum r_k`` instead of
``O(d_in d_out min(d_in, d_out))``. Everything is computed in float64.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Factors:
    """One adapted matrix's factors: the update is ``scale * b @ a``."""

    a: np.ndarray  # (rank, d_in)
    b: np.ndarray  # (d_out, rank)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    def update(self) -> np.ndarray:
        """The dense update ``scale * b @ a`` (float64): for tests and folding."""
        return float(self.scale) * (self.b.astype(np.float64) @ self.a.astype(np.float64))


@dataclass(frozen=True)
class LowRank:
    """A matrix held as ``left @ right`` (``d_out x k`` times ``k x d_in``)."""

    left: np.ndarray
    right: np.ndarray

    def dense(self) -> np.ndarray:
        out: np.ndarray = self.left @ self.right
        return out

    @property
    def rank(self) -> int:
        return int(self.left.shape[1])


@dataclass(frozen=True)
class SVD:
    """Thin SVD ``u @ diag(s) @ vt`` with ``s`` descending."""

    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray

    def tail_norm(self, rank: int) -> float:
        """Frobenius norm of what a rank-``rank`` truncation drops."""
        return float(np.sqrt(np.sum(self.s[rank:] ** 2)))

    def factors(self, rank: int, scale: float) -> Factors:
        """The best rank-``rank`` approximation as factors with ``scale``: singular values
        split evenly between ``B`` and ``A`` (``B = U sqrt(S/scale)``, ``A = sqrt(S/scale) V^T``),
        zero-padded when the matrix has lower rank."""
        if scale <= 0:
            raise ValueError(f"a LoRA scale must be positive, got {scale}")
        keep = min(rank, len(self.s))
        root = np.sqrt(self.s[:keep] / scale)
        a = np.zeros((rank, self.vt.shape[1]))
        b = np.zeros((self.u.shape[0], rank))
        a[:keep] = root[:, None] * self.vt[:keep]
        b[:, :keep] = self.u[:, :keep] * root[None, :]
        return Factors(a, b, scale)

    def tail(self, rank: int) -> LowRank:
        """What a rank-``rank`` truncation drops, as a low-rank matrix."""
        return LowRank(self.u[:, rank:] * self.s[None, rank:], self.vt[rank:])


def normalized(weights: Sequence[float] | np.ndarray, count: int) -> np.ndarray:
    """Aggregation weights as float64 summing to one; refuses a wrong count or bad values."""
    w = np.asarray(weights, np.float64)
    if w.shape != (count,):
        raise ValueError(f"need one weight per client: {count} clients, weights {w.shape}")
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite, non-negative, with a positive sum")
    out: np.ndarray = w / w.sum()
    return out


def weighted_mean(
    arrays: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray
) -> np.ndarray:
    """``sum_k w_k x_k / sum_k w_k`` in float64 (arrays of one shape)."""
    w = normalized(weights, len(arrays))
    return np.tensordot(w, np.stack([np.asarray(x, np.float64) for x in arrays]), axes=1)


def low_rank_svd(left: np.ndarray, right: np.ndarray) -> SVD:
    """Thin SVD of ``left @ right`` without forming it: QR of ``left`` and of ``right.T``,
    then the SVD of the small core ``R_l R_r^T``."""
    q_l, r_l = np.linalg.qr(np.asarray(left, np.float64))
    q_r, r_r = np.linalg.qr(np.asarray(right, np.float64).T)
    u_c, s, vt_c = np.linalg.svd(r_l @ r_r.T, full_matrices=False)
    return SVD(q_l @ u_c, s, vt_c @ q_r.T)


def product_svd(clients: Sequence[Factors], weights: Sequence[float] | np.ndarray) -> SVD:
    """SVD of the weighted mean update ``M = sum_k w_k s_k B_k A_k`` (weights normalized)."""
    if not clients:
        raise ValueError("no client factors to aggregate")
    w = normalized(weights, len(clients))
    left = np.concatenate(
        [wk * c.scale * np.asarray(c.b, np.float64) for wk, c in zip(w, clients, strict=True)], 1
    )
    right = np.concatenate([np.asarray(c.a, np.float64) for c in clients], 0)
    return low_rank_svd(left, right)


def product_mean(clients: Sequence[Factors], weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """The dense weighted mean update ``M`` (float64): the reference the modes are held to."""
    w = normalized(weights, len(clients))
    total = np.zeros_like(clients[0].update())
    for wk, c in zip(w, clients, strict=True):
        total += wk * c.update()
    return total


def _same_rank_and_scale(clients: Sequence[Factors], mode: str) -> tuple[int, float]:
    ranks = {c.rank for c in clients}
    scales = {float(c.scale) for c in clients}
    if len(ranks) != 1 or len(scales) != 1:
        raise ValueError(f"{mode} needs one rank and scale for all clients, got {ranks}, {scales}")
    return ranks.pop(), scales.pop()


def fedit(clients: Sequence[Factors], weights: Sequence[float] | np.ndarray) -> Factors:
    """FedIT: ``A`` and ``B`` averaged separately (inexact: its update is ``s B_bar A_bar``)."""
    _, scale = _same_rank_and_scale(clients, "fedit")
    return Factors(
        weighted_mean([c.a for c in clients], weights),
        weighted_mean([c.b for c in clients], weights),
        scale,
    )


def ffa(
    b: Sequence[np.ndarray], a: np.ndarray, scale: float, weights: Sequence[float] | np.ndarray
) -> Factors:
    """FFA-LoRA: the shared, frozen ``a`` and the mean of the clients' ``B`` (exact)."""
    return Factors(np.asarray(a, np.float64), weighted_mean(b, weights), scale)


@dataclass(frozen=True)
class ExactResult:
    """The new factors, the residual to fold into the base, and its Frobenius norm:
    ``factors.update() + residual.dense()`` is the weighted mean update ``M``."""

    factors: Factors
    residual: LowRank
    residual_norm: float


def exact(
    clients: Sequence[Factors], weights: Sequence[float] | np.ndarray, rank: int, scale: float
) -> ExactResult:
    """The exact mean update ``M``: its best rank-``rank`` part as factors with ``scale``,
    the rest as the residual that the frozen base absorbs (FedEx-LoRA)."""
    svd = product_svd(clients, weights)
    return ExactResult(svd.factors(rank, scale), svd.tail(rank), svd.tail_norm(rank))


@dataclass(frozen=True)
class HeteroResult:
    """Per rank: the factors clients of that rank receive and the Frobenius norm of what the
    projection drops (Eckart-Young's minimum); ``residual`` is what even the largest rank
    cannot hold (foldable into the base, as :func:`exact` does)."""

    factors: dict[int, Factors]
    tail_norms: dict[int, float]
    residual: LowRank


def hetero(
    clients: Sequence[Factors],
    weights: Sequence[float] | np.ndarray,
    scales: Mapping[int, float],
) -> HeteroResult:
    """Mean update of clients of any ranks, projected back to each rank in ``scales``
    (rank -> that rank's scale) by truncated SVD. The projections are nested: rank ``r``'s
    factors are the leading ``r`` components of the largest rank's."""
    if not scales:
        raise ValueError("hetero needs at least one target rank")
    svd = product_svd(clients, weights)
    top = max(scales)
    return HeteroResult(
        factors={r: svd.factors(r, s) for r, s in sorted(scales.items())},
        tail_norms={r: svd.tail_norm(r) for r in sorted(scales)},
        residual=svd.tail(top),
    )


def fedsa(a: Sequence[np.ndarray], weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """FedSA-LoRA: the weighted mean of the shared ``A`` (each client keeps its ``B``)."""
    return weighted_mean(a, weights)
