"""Fixed-point encoding of real vectors in the ring Z_{2^bits} (bits = 16, 32 or 64).

A value ``v`` with ``|v| <= bound`` becomes the integer ``round_stochastic(v * 2^f)`` taken
mod ``2^bits`` (two's complement). Stochastic rounding (up with probability equal to the
fractional part) keeps the encoding unbiased. Sums wrap mod ``2^bits``; the *headroom* rule
makes the true sum of ``n`` encodings always fit in the signed range:

    n * (bound * 2^f + 1) < 2^(bits - 1)

``frac_bits`` picks the largest ``f`` that satisfies it (and keeps ``bound * 2^f`` within
float64's exact integers, ``2^52``); a configuration that leaves fewer than ``min_frac_bits``
fractional bits is refused with a message naming the fix. Integer-valued inputs (a clipped
bit, a count) are encoded exactly whenever ``f >= 0``.

With a random rotation first (``secagg.rotation``, for 16-bit rings: half the bytes of
float32), a coordinate of the rotated sum is bounded by :func:`rotated_bound` of the sum's
norm except with probability ``ROTATION_FAILURE`` per coordinate, instead of by the norm
itself: the bound is probabilistic, and only the *sum* must fit (arithmetic is modular).
"""

from __future__ import annotations

import math

import numpy as np

from fedforge.core.errors import ConfigError

ROTATION_FAILURE = 1e-12  # per coordinate: the chance a rotated sum exceeds its bound
RING_DTYPES: dict[int, np.dtype] = {
    16: np.dtype(np.uint16),
    32: np.dtype(np.uint32),
    64: np.dtype(np.uint64),
}


def ring_dtype(bits: int) -> np.dtype:
    try:
        return RING_DTYPES[bits]
    except KeyError:
        raise ConfigError(
            f"the secure-aggregation ring has 16, 32 or 64 bits, got {bits}"
        ) from None


def frac_bits(bits: int, bound: float, clients: int, min_frac_bits: int | None = None) -> int:
    """The largest number of fractional bits whose sum of ``clients`` values in
    ``[-bound, bound]`` cannot wrap the ring (see the module's headroom rule)."""
    if not bound > 0 or clients < 1:
        raise ValueError("need a positive bound and at least one client")
    room = 2.0 ** (bits - 1) / clients - 1  # bound * 2^f must stay below this
    f = min(math.floor(math.log2(room / bound)) if room > bound else -1, 52 - _ceil_log2(bound))
    while f > -64 and clients * (bound * 2.0**f + 1) >= 2.0 ** (bits - 1):
        f -= 1
    if min_frac_bits is not None and f < min_frac_bits:
        raise ConfigError(
            f"secure aggregation: {clients} clients with values up to {bound:g} leave only "
            f"{f} fractional bits in a {bits}-bit ring (at least {min_frac_bits} needed; the "
            "sum could wrap or lose precision): set secagg.ring_bits = 64, lower the clip "
            "norm, or sample fewer clients per round"
        )
    return f


def _ceil_log2(x: float) -> int:
    return max(math.ceil(math.log2(x)), 0)


class Rounding:
    """Scratch for stochastic rounding, reused across the records of a chunk (fresh arrays
    as large as a model cost page faults every time); it grows to the longest vector."""

    def __init__(self, size: int = 0) -> None:
        self.size = -1
        self.reserve(size)

    def reserve(self, size: int) -> None:
        """Room for vectors of ``size`` values."""
        if size <= self.size:
            return
        self.size = size
        self._values, self._up, self._low = (np.empty(size) for _ in range(3))
        self._below = np.empty(size, bool)

    def values(self, n: int) -> np.ndarray:
        """Scratch for the float64 vector to encode (its caller fills it; encoding it
        overwrites it)."""
        return self._values[:n]

    def encode(
        self,
        values: np.ndarray,
        f: int,
        bits: int,
        rng: np.random.Generator,
        out: np.ndarray,
        scale: float = 1.0,
    ) -> None:
        """``scale * values * 2^f`` (a 1-D vector), rounded up with probability equal to its
        fractional part (so unbiased), into ``out`` as ring words."""
        n = len(values)
        if out.shape != (n,) or out.dtype != ring_dtype(bits):
            raise ValueError(f"{n} values round into {n} words of a {bits}-bit ring")
        self.reserve(n)
        scaled, up, low = self._values[:n], self._up[:n], self._low[:n]
        np.multiply(values, scale * 2.0**f, out=scaled)  # in place when values is scratch
        rng.random(out=up)
        np.floor(scaled, out=low)
        np.subtract(scaled, low, out=scaled)  # the fractional part, exactly
        np.add(low, np.less(up, scaled, out=self._below[:n]), out=low)
        ints = up.view(np.int64)  # the uniforms are spent
        np.copyto(ints, low, casting="unsafe")  # exact: integers below 2^53
        np.copyto(out, ints.view(np.uint64), casting="unsafe")  # mod 2^bits


def encode(values: np.ndarray, f: int, bits: int, rng: np.random.Generator) -> np.ndarray:
    """Stochastically rounded ``values * 2^f`` as ring words (values already bounded)."""
    flat = np.asarray(values, np.float64).ravel()
    out = np.empty(len(flat), ring_dtype(bits))
    Rounding(len(flat)).encode(flat, f, bits, rng, out)
    return out.reshape(np.shape(values))


def decode(words: np.ndarray, f: int, bits: int) -> np.ndarray:
    """The signed real values of ring words (a sum that did not wrap)."""
    signed_type = {16: np.int16, 32: np.int32, 64: np.int64}[bits]
    signed = words.astype(ring_dtype(bits)).view(signed_type)
    return signed.astype(np.float64) * 2.0**-f


def rotated_bound(clip_norm: float, size: int, failure: float = ROTATION_FAILURE) -> float:
    """A bound on one coordinate of a randomly rotated vector of L2 norm <= ``clip_norm``
    (random signs, then an orthonormal Hadamard transform of ``size`` coordinates), exceeded
    with probability at most ``failure`` (Hoeffding: each coordinate is a Rademacher sum)."""
    return clip_norm * math.sqrt(2 * math.log(2 / failure) / size)
