"""Model-poisoning attacks on flattened updates: pure functions, numpy in, numpy out.

``own`` is the (m, d) stack of the attackers' honestly computed updates, one row per attacker.
Omniscient attacks (ALIE, IPM) instead receive ``honest``, the (k, d) stack of the benign
clients' updates of the round, as their papers assume. Every attack returns an (m, d) array in
the dtype of its input (``gaussian``: the ``dtype`` asked for); statistics are computed in
float64 and cast back. Random attacks draw only from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
from numpy.typing import DTypeLike

__all__ = [
    "alie_z_max",
    "gaussian",
    "inner_product_manipulation",
    "little_is_enough",
    "scaled",
    "sign_flip",
]


def sign_flip(own: np.ndarray, scale: float = 1.0) -> np.ndarray:
    """Sign flipping: each attacker sends ``-scale * own`` (e.g. Damaskinos et al. 2018)."""
    x = _stack(own, "own")
    _check_positive(scale, "scale")
    return (-scale * x).astype(x.dtype, copy=False)


def scaled(own: np.ndarray, factor: float) -> np.ndarray:
    """Boosted update / model replacement (Bagdasaryan et al. 2020, "How to backdoor federated
    learning"): each attacker sends ``factor * own``; ``factor = n / server_lr`` replaces the
    global model with the attacker's when the other updates are small."""
    x = _stack(own, "own")
    if not math.isfinite(factor):
        raise ValueError(f"factor must be finite, got {factor}")
    return (factor * x).astype(x.dtype, copy=False)


def gaussian(
    own_shape: tuple[int, int],
    std: float,
    rng: np.random.Generator,
    dtype: DTypeLike = np.float32,
) -> np.ndarray:
    """Gaussian noise updates: each of the m attackers sends a draw of N(0, std^2 I_d)
    (the "Gaussian" Byzantine baseline of Blanchard et al. 2017, Krum)."""
    if len(own_shape) != 2 or min(own_shape) < 1:
        raise ValueError(f"own_shape must be (m, d) with m, d >= 1, got {tuple(own_shape)}")
    if not (math.isfinite(std) and std >= 0):
        raise ValueError(f"std must be finite and >= 0, got {std}")
    if not isinstance(rng, np.random.Generator):
        raise ValueError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    if not np.issubdtype(np.dtype(dtype), np.floating):
        raise ValueError(f"dtype must be a floating dtype, got {np.dtype(dtype)}")
    return rng.normal(0.0, std, size=own_shape).astype(dtype, copy=False)


def alie_z_max(num_clients: int, num_byzantine: int) -> float:
    """ALIE's largest safe deviation (Baruch et al. 2019, Alg. 3): with n clients of which f are
    Byzantine, s = floor(n/2 + 1) - f honest clients must be "won over" for the Byzantine vector
    to look like the majority, and z_max = Phi^{-1}((n - s) / n), Phi the standard normal CDF.
    Needs 1 <= f <= floor(n/2) (so that s >= 1)."""
    n, f = num_clients, num_byzantine
    if f < 1:
        raise ValueError(f"num_byzantine must be >= 1, got {f}")
    if n <= f:
        raise ValueError(f"num_clients (n={n}) must exceed num_byzantine (f={f})")
    s = n // 2 + 1 - f
    if s < 1:
        raise ValueError(
            f"ALIE needs s = floor(n/2 + 1) - f >= 1, i.e. f <= {n // 2} at n={n}; got f={f}"
        )
    return NormalDist().inv_cdf((n - s) / n)


def little_is_enough(
    honest: np.ndarray,
    num_byzantine: int,
    num_clients: int | None = None,
    z: float | None = None,
) -> np.ndarray:
    """ALIE, "A little is enough" (Baruch et al. 2019): every attacker sends the same vector
    ``mu_j - z * sigma_j`` per coordinate j, where mu and sigma are the mean and sample
    standard deviation (ddof=1, torch.std's default) of the honest updates. By default
    ``z = z_max = Phi^{-1}((n - s) / n)`` with ``s = floor(n/2 + 1) - f``, n = ``num_clients``
    (default: k honest + f Byzantine) and f = ``num_byzantine``; see :func:`alie_z_max`.
    A shift of z honest standard deviations (z < 1 unless f is near n/2) is small enough to
    pass median-, Krum- and trimmed-mean-style defences, yet consistent across rounds.
    Returns (num_byzantine, d)."""
    h = _stack(honest, "honest")
    if len(h) < 2:
        raise ValueError(f"ALIE needs >= 2 honest updates for a standard deviation, got {len(h)}")
    n = len(h) + num_byzantine if num_clients is None else num_clients
    if z is None:
        z = alie_z_max(n, num_byzantine)
    elif num_byzantine < 1:
        raise ValueError(f"num_byzantine must be >= 1, got {num_byzantine}")
    elif not math.isfinite(z):
        raise ValueError(f"z must be finite, got {z}")
    h64 = h.astype(np.float64, copy=False)
    vector = h64.mean(axis=0) - z * h64.std(axis=0, ddof=1)
    return np.repeat(vector[None, :], num_byzantine, axis=0).astype(h.dtype, copy=False)


def inner_product_manipulation(
    honest: np.ndarray, epsilon: float, num_byzantine: int
) -> np.ndarray:
    """Inner-product manipulation (Xie et al. 2019, "Fall of empires"): every attacker sends
    ``-epsilon * mean(honest)``, so that the aggregate's inner product with the true mean turns
    negative (large epsilon against the mean) or survives robust rules (small epsilon, e.g. 0.1,
    against median and Krum). Returns (num_byzantine, d)."""
    h = _stack(honest, "honest")
    _check_positive(epsilon, "epsilon")
    if num_byzantine < 1:
        raise ValueError(f"num_byzantine must be >= 1, got {num_byzantine}")
    vector = -epsilon * h.astype(np.float64, copy=False).mean(axis=0)
    return np.repeat(vector[None, :], num_byzantine, axis=0).astype(h.dtype, copy=False)


def _stack(x: np.ndarray, name: str) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty (rows, d) stack of updates, got {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise ValueError(f"{name} must have a floating dtype, got {a.dtype}")
    return a


def _check_positive(value: float, name: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
