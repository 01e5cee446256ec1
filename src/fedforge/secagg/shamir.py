"""Shamir secret sharing of 32-byte secrets over the prime field GF(2^521 - 1).

A secret is the constant term of a random polynomial of degree ``threshold - 1``; holder
``h`` gets the polynomial's value at ``x = h + 1``. Any ``threshold`` shares recover the
secret by Lagrange interpolation at 0; fewer reveal nothing about it. The field is larger
than every 32-byte secret, so a secret is one field element. Coefficients come from the
operating system's entropy (``secrets``).
"""

from __future__ import annotations

import secrets as _entropy
from collections.abc import Mapping, Sequence
from functools import lru_cache

from fedforge.core.errors import FedforgeError

PRIME = (1 << 521) - 1  # a Mersenne prime
SHARE_BYTES = 66  # one field element, big-endian
SECRET_BYTES = 32


class ShareError(FedforgeError):
    """Shares that cannot recover a secret (too few, duplicated, malformed)."""


def split(secret: bytes, threshold: int, holders: Sequence[int]) -> dict[int, bytes]:
    """Shares of ``secret`` for each holder id (ids >= 0, distinct); any ``threshold``
    of them recover it."""
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"a shared secret is {SECRET_BYTES} bytes, got {len(secret)}")
    if len(set(holders)) != len(holders) or any(h < 0 for h in holders):
        raise ValueError("share holders must be distinct non-negative ids")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold {threshold} must be in [1, {len(holders)}] holders")
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [_entropy.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for holder in holders:
        x, value = holder + 1, 0
        for c in reversed(coefficients):  # Horner
            value = (value * x + c) % PRIME
        shares[int(holder)] = value.to_bytes(SHARE_BYTES, "big")
    return shares


@lru_cache(maxsize=4096)
def _lagrange_at(xs: tuple[int, ...], x: int) -> tuple[int, ...]:
    """The Lagrange basis coefficients at ``x`` for the points ``xs`` (cached: in a complete
    graph every secret is recovered from the same holders)."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if i != j:
                num = num * (x - xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def _value(share: bytes) -> int:
    if len(share) != SHARE_BYTES:
        raise ShareError(f"a share is {SHARE_BYTES} bytes, got {len(share)}")
    value = int.from_bytes(share, "big")
    if value >= PRIME:
        raise ShareError("a share is not a field element")
    return value


def is_field_element(share: bytes) -> bool:
    return len(share) == SHARE_BYTES and int.from_bytes(share, "big") < PRIME


def combine(shares: Mapping[int, bytes], threshold: int, *, consistent: bool = False) -> bytes:
    """The secret from at least ``threshold`` shares (holder id -> share bytes).
    ``consistent``: also check that every share lies on the polynomial the first
    ``threshold`` define (shares dealt by one honest dealer always do)."""
    if len(shares) < threshold:
        raise ShareError(f"{len(shares)} shares cannot recover a secret shared {threshold}-of-n")
    holders = sorted(shares)
    chosen = holders[:threshold]
    values = [_value(shares[h]) for h in chosen]
    xs = tuple(h + 1 for h in chosen)
    secret = sum(v * b for v, b in zip(values, _lagrange_at(xs, 0), strict=True)) % PRIME
    if secret >> (8 * SECRET_BYTES):
        raise ShareError("the shares do not recover a 32-byte secret (inconsistent shares)")
    if consistent:
        for h in holders[threshold:]:
            basis = _lagrange_at(xs, h + 1)
            if sum(v * b for v, b in zip(values, basis, strict=True)) % PRIME != _value(shares[h]):
                raise ShareError("the shares do not lie on one polynomial (inconsistent shares)")
    return secret.to_bytes(SECRET_BYTES, "big")
