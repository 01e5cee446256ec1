"""The discrete Gaussian N_Z(0, sigma^2) (Canonne, Kamath, Steinke 2020), for noise added in
secure aggregation's integer ring (the distributed discrete Gaussian, Kairouz et al. 2021).

Sampling is Algorithm 3 of Canonne et al.: draw ``Y`` from the discrete Laplace with scale
``t = floor(sigma) + 1`` (a difference of two geometrics), accept it with probability
``exp(-(|Y| - sigma^2 / t)^2 / (2 sigma^2))``. Uniforms come from an AES-256-CTR keystream
(``privacy/noise.py``), keyed from the operating system unless the run asks for seeded
noise. The acceptance test runs in float64, not in exact arithmetic: for the scales used here
(hundreds of thousands of ring units) that changes no probability by more than 1e-15.

The sum of ``m`` independent N_Z(0, s^2) is within total-variation distance ``tau`` of
N_Z(0, m s^2) (Kairouz et al. 2021, Proposition 14), which :func:`sum_distance` bounds; the
discrete Gaussian of variance ``v`` is ``Delta^2 / (2 v)``-zCDP for L2 sensitivity ``Delta``
(Canonne et al., Theorem 4), as the continuous one.
"""

from __future__ import annotations

import math

import numpy as np

from fedforge.privacy.noise import keystream_uniforms


def sample(sigma: float, size: int, key: bytes) -> np.ndarray:
    """``size`` draws of N_Z(0, sigma^2) as int64, a deterministic function of ``key``."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    t = math.floor(sigma) + 1
    out = np.empty(0, np.int64)
    counter, rate = 0, 0.5  # the acceptance rate, refined from each batch
    while len(out) < size:
        batch = max(int(1.1 * (size - len(out)) / rate), 1024)
        sub = (key[:28] + counter.to_bytes(4, "little")) if counter else key
        u = keystream_uniforms(sub, 3 * batch)
        counter += 1
        # Geometric(1 - exp(-1/t)) on {0, 1, ...} by inversion, twice: a discrete Laplace.
        g1 = np.floor(-t * np.log(u[:batch]))
        g2 = np.floor(-t * np.log(u[batch : 2 * batch]))
        y = g1 - g2
        accept = u[2 * batch :] <= np.exp(-((np.abs(y) - sigma**2 / t) ** 2) / (2 * sigma**2))
        out = np.concatenate([out, y[accept].astype(np.int64)])
        rate = max(float(accept.mean()), 0.05)
    return out[:size]


def sum_distance(sigma: float, contributors: int) -> float:
    """A bound on the total-variation distance between the sum of ``contributors`` draws of
    N_Z(0, sigma^2) and N_Z(0, contributors * sigma^2) (Kairouz et al. 2021)."""
    return 10 * sum(
        math.exp(-2 * math.pi**2 * sigma**2 * k / (k + 1)) for k in range(1, contributors)
    )


def release_rho(clip_units: float, words: int, contributors: int, noise_units: float) -> float:
    """zCDP rho of one distributed-DP release (Kairouz et al. 2021, Theorem 1): the sum of
    ``contributors`` discrete Gaussians of stddev ``noise_units`` each (ring units) on
    ``words`` coordinates is ``Delta^2 / (2 m s^2) + tau d / 4``-zCDP, ``tau`` bounding how far
    that sum is from one discrete Gaussian per coordinate (:func:`sum_distance`; the slack
    is added to rho, not taken off delta).

    Adjacency: replace one client's record, as local DP (the server knows who took part, so
    adding or removing a participant is no secret to protect). A record is clipped to
    ``clip_units`` and stochastic rounding moves each coordinate by less than one unit, so two
    records differ by at most ``Delta = 2 (clip_units + sqrt(words))``."""
    if noise_units <= 0:
        return 0.0
    sensitivity = 2 * (clip_units + math.sqrt(words))
    tau = sum_distance(noise_units, contributors)
    return sensitivity**2 / (2 * contributors * noise_units**2) + tau * words / 4
