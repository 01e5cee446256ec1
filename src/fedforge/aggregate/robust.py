"""Byzantine-robust aggregation rules: pure functions on a stack of flattened updates.

Every rule takes ``updates`` of shape (n, d), float32 or float64, one row per client. Rows are
assumed finite (validation rejects non-finite updates before aggregation). Weighted rules also
take ``weights`` (n,), non-negative with a positive sum; rules that ignore them say so (a
Byzantine client can lie about its sample count). Each rule returns a :class:`RobustResult`:
the aggregate in float64, and which rows it excluded or down-weighted, for the history.

Memory stays at the input plus O(n*n + n*block). Pairwise distances come from one Gram matrix
built block by block in float64 (BLAS, no loop over pairs). Coordinate-wise rules sort one
block of columns at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from fedforge.core.errors import ConfigError

RULES = (
    "coordinate_median",
    "trimmed_mean",
    "krum",
    "bulyan",
    "geometric_median",
    "norm_bound",
    "centered_clipping",
)
_BLOCK = 4096  # columns per block: an (n, block) float64 slab stays in cache
_NU = 1e-6  # Weiszfeld smoothing: distances are floored at nu (Pillutla et al.)


@dataclass(frozen=True)
class RobustResult:
    """A rule's aggregate (d,) in float64. ``excluded`` lists the rows not used at all;
    ``downweighted`` the rows whose influence was reduced (clipped, re-weighted); ``info``
    holds scalar diagnostics (iterations, the clipping bound)."""

    update: np.ndarray
    excluded: np.ndarray
    downweighted: np.ndarray
    info: dict[str, float] = field(default_factory=dict)


# --- bounds -------------------------------------------------------------------------------


def check_bounds(rule: str, n: int, f: int, *, m: int = 1, beta: float | None = None) -> None:
    """Refuse, before any round, a rule that cannot tolerate ``f`` Byzantine clients among
    ``n`` per round: Krum n > 2f + 2 (and Multi-Krum 1 <= m <= n - f), Bulyan n >= 4f + 3,
    trimmed mean 2*floor(beta*n) < n and floor(beta*n) >= f, every other rule n >= 2f + 1."""
    if rule not in RULES:
        raise ConfigError(f"unknown robust aggregator {rule!r}; choose one of {', '.join(RULES)}")
    if n < 1 or f < 0:
        raise ConfigError(f"need n >= 1 clients per round and f >= 0, got n={n}, f={f}")
    if rule == "krum":
        _check_krum(n, f, m)
    elif rule == "bulyan":
        _check_bulyan(n, f)
    elif rule == "trimmed_mean":
        if beta is None:
            raise ConfigError("trimmed_mean needs beta, the fraction trimmed at each end")
        k = _check_trim(n, beta)
        if k < f:
            raise ConfigError(
                f"trimmed mean needs floor(beta*n) >= f to trim every Byzantine value: "
                f"beta={beta} trims {k} per end at n={n}, f={f}; use beta >= {(f + 0.5) / n:.4g}"
            )
    elif 2 * f >= n:
        raise ConfigError(
            f"{rule} needs n >= 2f + 1 (an honest majority): n={n}, f={f}; "
            f"use at least {2 * f + 1} clients per round or a smaller f"
        )


def _check_f(f: int) -> None:
    if f < 0:
        raise ConfigError(f"f, the number of Byzantine clients tolerated, must be >= 0, got {f}")


def _check_krum(n: int, f: int, m: int) -> None:
    _check_f(f)
    if n <= 2 * f + 2:
        raise ConfigError(
            f"Krum needs n > 2f + 2 (Blanchard et al. 2017): n={n}, f={f}; "
            f"use at least {2 * f + 3} clients per round or a smaller f"
        )
    if not 1 <= m <= n - f:
        raise ConfigError(
            f"Multi-Krum needs 1 <= m <= n - f (more would average a Byzantine update): "
            f"m={m}, n={n}, f={f}"
        )


def _check_bulyan(n: int, f: int) -> None:
    _check_f(f)
    if n < 4 * f + 3:
        raise ConfigError(
            f"Bulyan needs n >= 4f + 3 (El Mhamdi et al. 2018): n={n}, f={f}; "
            f"use at least {4 * f + 3} clients per round or a smaller f"
        )


def _check_trim(n: int, beta: float) -> int:
    """Values trimmed at each end: int(beta * n), as scipy.stats.trim_mean counts them."""
    if not 0 <= beta < 1:
        raise ConfigError(f"trimmed mean beta must be in [0, 1), got {beta}")
    k = int(beta * n)
    if 2 * k >= n:
        raise ConfigError(
            f"trimmed mean needs 2*floor(beta*n) < n so a value is left per coordinate: "
            f"beta={beta}, n={n} trims {k} at each end"
        )
    return k


# --- shared pieces ------------------------------------------------------------------------


def _stack(updates: np.ndarray) -> np.ndarray:
    x = np.asarray(updates)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"updates must be a non-empty (n, d) stack, got shape {x.shape}")
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    return x


def _alphas(weights: np.ndarray, n: int) -> np.ndarray:
    """Weights normalized to sum 1."""
    w = np.asarray(weights, np.float64)
    if w.shape != (n,):
        raise ValueError(f"need one weight per update: {n} updates, weights of shape {w.shape}")
    if not np.isfinite(w).all() or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be finite and non-negative with a positive sum")
    alpha: np.ndarray = w / w.sum()
    return alpha


def _rows(mask: np.ndarray) -> np.ndarray:
    return np.flatnonzero(mask).astype(np.int64)


def _none() -> np.ndarray:
    return np.zeros(0, np.int64)


def _blocks(d: int) -> Iterator[slice]:
    for start in range(0, d, _BLOCK):
        yield slice(start, min(start + _BLOCK, d))


def _sorted_columns(
    x: np.ndarray, rows: np.ndarray | None = None
) -> Iterator[tuple[slice, np.ndarray]]:
    """Per block of columns: (columns, x[rows, columns].T sorted along axis 1). One buffer is
    reused, so a block is valid until the next one. Copying row by row into the transposed
    buffer is about 3x faster than NumPy's transposing copy."""
    picked = np.arange(len(x)) if rows is None else rows
    buf = np.empty((min(_BLOCK, x.shape[1]), len(picked)), x.dtype)
    for cols in _blocks(x.shape[1]):
        block = buf[: cols.stop - cols.start]
        for j, row in enumerate(picked):
            block[:, j] = x[row, cols]
        block.sort(axis=1)
        yield cols, block


def _combine(x: np.ndarray, coef: np.ndarray) -> np.ndarray:
    """sum_i coef_i x_i in float64, block by block (no float64 copy of the whole stack)."""
    rows = np.flatnonzero(coef)
    out = np.zeros(x.shape[1])
    if len(rows) == 0:
        return out
    few = 2 * len(rows) <= len(x)  # gather the few rows used; else zeros cost less
    c = coef[rows] if few else coef
    for cols in _blocks(x.shape[1]):
        out[cols] = c @ np.asarray(x[rows, cols] if few else x[:, cols], dtype=np.float64)
    return out


def _row_sq_norms(x: np.ndarray, center: np.ndarray | None = None) -> np.ndarray:
    """||x_i - center||^2 for every row, in float64."""
    out = np.zeros(len(x))
    for cols in _blocks(x.shape[1]):
        part = x[:, cols].astype(np.float64)
        if center is not None:
            part -= center[cols]
        out += np.einsum("ij,ij->i", part, part)
    return out


def _gram(x: np.ndarray) -> np.ndarray:
    """Gram matrix of the rows after subtracting each column's mean, in float64. Distances
    are translation-invariant; centering removes the common component that would otherwise
    cancel in ||a||^2 + ||b||^2 - 2ab."""
    g = np.zeros((len(x), len(x)))
    for cols in _blocks(x.shape[1]):
        part = x[:, cols].astype(np.float64)
        part -= part.mean(axis=0)
        g += part @ part.T
    return g


def pairwise_sq_distances(updates: np.ndarray) -> np.ndarray:
    """(n, n) squared Euclidean distances from one Gram matrix, clamped at 0."""
    g = _gram(_stack(updates))
    sq = np.diag(g)
    dist: np.ndarray = np.maximum(sq[:, None] + sq[None, :] - 2.0 * g, 0.0)
    dist = 0.5 * (dist + dist.T)
    np.fill_diagonal(dist, 0.0)
    return dist


def _krum_scores(dist: np.ndarray, f: int) -> np.ndarray:
    """Sum of squared distances to the n - f - 2 nearest other rows (at least one)."""
    n = len(dist)
    if n == 1:
        return np.zeros(1)
    k = min(max(n - f - 2, 1), n - 1)
    others = dist + np.diag(np.full(n, np.inf))
    scores: np.ndarray = np.partition(others, k - 1, axis=1)[:, :k].sum(axis=1)
    return scores


# --- rules --------------------------------------------------------------------------------


def coordinate_median(updates: np.ndarray) -> RobustResult:
    """Coordinate-wise median (Yin et al. 2018), equal to ``np.median`` over axis 0 in float64.
    Unweighted: sample counts are ignored."""
    x = _stack(updates)
    n = len(x)
    out = np.empty(x.shape[1])
    for cols, s in _sorted_columns(x):
        lo, hi = s[:, (n - 1) // 2].astype(np.float64), s[:, n // 2]
        out[cols] = lo if n % 2 else (lo + hi) / 2
    return RobustResult(out, _none(), _none())


def trimmed_mean(updates: np.ndarray, beta: float) -> RobustResult:
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the floor(beta*n)
    largest and smallest values and average the rest; equals ``scipy.stats.trim_mean``.
    Unweighted: sample counts are ignored."""
    x = _stack(updates)
    n = len(x)
    k = _check_trim(n, beta)
    out = np.empty(x.shape[1])
    for cols, s in _sorted_columns(x):
        out[cols] = s[:, k : n - k].sum(axis=1, dtype=np.float64) / (n - 2 * k)
    return RobustResult(out, _none(), _none(), {"trimmed_per_end": float(k)})


def krum(updates: np.ndarray, f: int, m: int = 1) -> RobustResult:
    """Krum, and Multi-Krum for m > 1 (Blanchard et al. 2017): score each row by the sum of
    squared distances to its n - f - 2 nearest neighbours and average the m best (ties go to
    the lower row). Needs n > 2f + 2. Unweighted: sample counts are ignored."""
    x = _stack(updates)
    n = len(x)
    _check_krum(n, f, m)
    scores = _krum_scores(pairwise_sq_distances(x), f)
    chosen = np.sort(np.argsort(scores, kind="stable")[:m])
    coef = np.zeros(n)
    coef[chosen] = 1.0 / m
    excluded = _rows(coef == 0)
    info = {"neighbours": float(n - f - 2), "score_max_selected": float(scores[chosen].max())}
    return RobustResult(_combine(x, coef), excluded, _none(), info)


def bulyan(updates: np.ndarray, f: int) -> RobustResult:
    """Bulyan (El Mhamdi et al. 2018): pick theta = n - 2f rows by Krum applied again and again
    to the rows not yet picked (one distance matrix for every round of it), then per coordinate
    average the beta = theta - 2f picked values closest to their median. Needs n >= 4f + 3.
    Unweighted: sample counts are ignored."""
    x = _stack(updates)
    n = len(x)
    _check_bulyan(n, f)
    theta, beta = n - 2 * f, n - 4 * f
    dist = pairwise_sq_distances(x)
    remaining = np.arange(n)
    for _ in range(theta):
        best = int(np.argmin(_krum_scores(dist[np.ix_(remaining, remaining)], f)))
        remaining = np.delete(remaining, best)
    picked = np.setdiff1d(np.arange(n), remaining)
    out = np.empty(x.shape[1])
    positions = np.arange(theta, dtype=np.int32)
    for cols, s in _sorted_columns(x, picked):
        twice_median = np.add(s[:, (theta - 1) // 2], s[:, theta // 2], dtype=np.float64)
        # The beta values nearest the median are a window [start, start + beta) of the sorted
        # values; it moves right past every a with median - s[a] > s[a + beta] - median.
        pairs = np.add(s[:, : 2 * f], s[:, beta:], dtype=np.float64)
        start = np.count_nonzero(pairs < twice_median[:, None], axis=1).astype(np.int32)
        window = (positions - start[:, None]).view(np.uint32) < beta  # negatives wrap high
        out[cols] = np.sum(s, axis=1, where=window, dtype=np.float64) / beta
    info = {"theta": float(theta), "beta": float(beta)}
    return RobustResult(out, remaining.astype(np.int64), _none(), info)


def geometric_median(
    updates: np.ndarray, weights: np.ndarray, tol: float = 1e-6, max_iter: int = 100
) -> RobustResult:
    """Weighted geometric median by smoothed Weiszfeld iterations, as in RFA (Pillutla et al.
    2022): v <- sum_i b_i x_i / sum_i b_i with b_i = w_i / max(nu, ||v - x_i||), nu = 1e-6,
    from the weighted mean, until the objective sum_i w_i ||v - x_i|| changes by at most
    ``tol`` relative, or ``max_iter`` iterations. The iterate is kept as coefficients on the
    rows, so each iteration costs O(n^2) on one Gram matrix. ``downweighted``: rows whose
    final coefficient is below half their normalized weight (about: more than twice the
    weighted harmonic mean distance from the median); ``excluded``: rows of weight 0."""
    x = _stack(updates)
    alpha = _alphas(weights, len(x))
    if not tol >= 0 or max_iter < 1:
        raise ConfigError(
            f"geometric median needs tol >= 0 and max_iter >= 1, got {tol}, {max_iter}"
        )
    g = _gram(x)
    sq = np.diag(g)

    def distances(a: np.ndarray) -> np.ndarray:  # ||x_i - sum_j a_j x_j|| with sum a = 1
        ga = g @ a
        d: np.ndarray = np.sqrt(np.maximum(sq - 2.0 * ga + a @ ga, 0.0))
        return d

    coef = alpha
    objective = float(alpha @ distances(coef))
    iterations, converged = 0, False
    while iterations < max_iter and not converged:
        b = alpha / np.maximum(_NU, distances(coef))
        coef = b / b.sum()
        previous, objective = objective, float(alpha @ distances(coef))
        iterations += 1
        converged = abs(previous - objective) <= tol * objective
    down = (alpha > 0) & (coef < alpha / 2)
    info = {"iterations": float(iterations), "objective": objective, "converged": float(converged)}
    return RobustResult(_combine(x, coef), _rows(alpha == 0), _rows(down), info)


def norm_bound(
    updates: np.ndarray,
    weights: np.ndarray,
    max_norm: float | None = None,
    quantile: float | None = None,
) -> RobustResult:
    """Norm bounding (Sun et al. 2019): scale every update to L2 norm at most ``max_norm``, or
    at most the ``quantile`` of this round's norms (rows of positive weight), then take the
    weighted mean. ``downweighted``: the clipped rows; ``excluded``: rows of weight 0."""
    x = _stack(updates)
    alpha = _alphas(weights, len(x))
    if (max_norm is None) == (quantile is None):
        raise ConfigError("norm_bound needs exactly one of max_norm or quantile")
    norms = np.sqrt(_row_sq_norms(x))
    if max_norm is not None:
        if not max_norm > 0:
            raise ConfigError(f"norm_bound max_norm must be > 0, got {max_norm}")
        bound = float(max_norm)
    else:
        if quantile is None or not 0 < quantile <= 1:
            raise ConfigError(f"norm_bound quantile must be in (0, 1], got {quantile}")
        bound = float(np.quantile(norms[alpha > 0], quantile))
    clipped = (norms > bound) & (alpha > 0)
    scale = np.where(clipped, bound / np.where(clipped, norms, 1.0), 1.0)
    info = {"bound": bound, "clipped": float(clipped.sum())}
    return RobustResult(_combine(x, alpha * scale), _rows(alpha == 0), _rows(clipped), info)


def centered_clipping(
    updates: np.ndarray,
    weights: np.ndarray,
    center: np.ndarray,
    tau: float,
    iterations: int = 1,
) -> RobustResult:
    """Centered clipping (Karimireddy, He and Jaggi 2021): starting from ``center`` (the
    previous aggregate or server momentum; zeros allowed), repeat ``iterations`` times
    v <- v + sum_i w_i clip(x_i - v, tau) / sum_i w_i, where clip scales a vector to norm at
    most ``tau``. ``downweighted``: rows clipped in any iteration; ``excluded``: rows of
    weight 0."""
    x = _stack(updates)
    alpha = _alphas(weights, len(x))
    v = np.array(center, dtype=np.float64)
    if v.shape != (x.shape[1],):
        raise ValueError(f"center must have shape ({x.shape[1]},), got {v.shape}")
    if not tau > 0 or iterations < 1:
        raise ConfigError(
            f"centered clipping needs tau > 0 and iterations >= 1, got {tau}, {iterations}"
        )
    ever = np.zeros(len(x), bool)
    clipped = np.zeros(len(x), bool)
    for _ in range(iterations):
        dist = np.sqrt(_row_sq_norms(x, v))
        clipped = (dist > tau) & (alpha > 0)
        c = alpha * np.where(clipped, tau / np.where(clipped, dist, 1.0), 1.0)
        v = v + _combine(x, c) - c.sum() * v  # v + sum_i c_i (x_i - v)
        ever |= clipped
    info = {"iterations": float(iterations), "clipped_last": float(clipped.sum())}
    return RobustResult(v, _rows(alpha == 0), _rows(ever), info)
