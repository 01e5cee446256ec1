"""What the server verifies in a secure-aggregation session, so that one hostile or broken
client is excluded at the step where it cheats instead of failing its honest neighbours.

- Advertised keys: two canonical X25519 points, neither of low order, not the two halves of
  one key, and no other client's; in deployment signed by a client certificate of the run's
  CA whose name is the sender's own (the same check every neighbour repeats).
- Disputes: a client names the neighbours whose share did not authenticate or did not match
  its dealer's digest. The server cannot open a share, so it cannot tell who lies; it excludes
  the fewest clients that end every dispute (greedily: the client in the most disputes
  first; two clients in one dispute alone are both excluded).
- The sum: what clipped, weighted inputs can add up to, so a crafted input or share is
  refused instead of applied.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from fedforge.secagg import crypto
from fedforge.secagg.session import unpack_identity

# How far a sum of discrete Gaussians strays, in stddevs beyond sqrt(d) (sub-Gaussian tail:
# exceeded with probability below exp(-NOISE_TAIL**2 / 2), 2e-22).
NOISE_TAIL = 10.0


def key_problem(keys: bytes, others: Mapping[int, bytes]) -> str | None:
    """Why a client's advertised ``c_pk | s_pk`` must be refused (``others``: the keys the
    session accepted so far), or None."""
    halves = (keys[:32], keys[32:])
    try:
        for half in halves:
            crypto.check_public_key(half)
    except crypto.SecAggError as exc:
        return str(exc)
    if halves[0] == halves[1]:
        return "its two public keys are the same key"
    for other, theirs in others.items():
        if set(halves) & {theirs[:32], theirs[32:]}:
            return f"it advertised the public key of client {other}"
    return None


def identity_problem(
    ca_pem: bytes,
    identity: np.ndarray,
    statement: Callable[[str], bytes],
    expected_name: str | None,
) -> str | None:
    """Why a client's signed keys must be refused: the certificate is not a client
    certificate of the run's CA valid now, it did not sign ``statement(name)``, or its name
    is not the sender's (``expected_name``, when the server knows it)."""
    try:
        signature, certificate = unpack_identity(identity)
        name = crypto.verify(ca_pem, certificate, signature, statement)
    except crypto.SecAggError as exc:
        return str(exc)
    if expected_name is not None and name != expected_name:
        return f"its keys are signed with the certificate of {name!r}, not its own"
    return None


def settle_disputes(
    refusals: Mapping[int, Sequence[int]], describe: Callable[[int], str] = str
) -> dict[int, str]:
    """The clients to exclude (id -> why) so that no dispute is left: each refusal
    ``accuser -> accused`` says one of the two broke the protocol. Greedy vertex cover of
    the dispute graph: the client in the most disputes goes first (one client refusing
    many, or refused by many, is the likelier cheat); disputes that share no client
    exclude both of theirs."""
    edges = {frozenset((a, b)) for a, accused in refusals.items() for b in accused if a != b}
    why: dict[int, list[str]] = {}
    for accuser, accused in refusals.items():
        for b in accused:
            why.setdefault(b, []).append(f"{describe(accuser)} refused its share")
            why.setdefault(accuser, []).append(f"it refused the share of {describe(b)}")
    excluded: dict[int, str] = {}
    while edges:
        degree = Counter(c for edge in edges for c in edge)
        top = max(degree.values())
        chosen = (
            [min(c for c, d in degree.items() if d == top)]
            if top > 1
            else sorted(c for edge in edges for c in edge)
        )
        for client in chosen:
            excluded[client] = "disputed shares: " + "; ".join(sorted(why[client]))
        edges = {edge for edge in edges if not edge & set(chosen)}
    return excluded


def sum_problem(
    arrays: np.ndarray,
    scalars: np.ndarray,
    clipped: float | None,
    *,
    total_weight: float,
    clip_norm: float,
    contributors: int,
    unit: float,
    scalar_unit: float,
    scalar_bound: float,
    noise_std: float,
) -> str | None:
    """Why a decoded secure sum is one no honest inputs produce, or None.

    ``arrays``: the ring words of the arrays as reals (``unit`` apart, before any inverse
    rotation, which keeps norms). Each of ``contributors`` clients clips its record to
    ``clip_norm`` and multiplies it by its weight, so the sum's norm is at most
    ``total_weight * clip_norm``, plus stochastic rounding (under one ``unit`` per
    coordinate per client) and, under distributed DP, noise of stddev ``noise_std`` per
    coordinate. Each summed scalar is at most ``scalar_bound`` per client; the clipped bit
    sums to a count in ``[0, contributors]``."""
    d = max(len(arrays), 1)
    rounding = contributors * math.sqrt(d) * unit
    noise = noise_std * (math.sqrt(d) + NOISE_TAIL)
    bound = total_weight * clip_norm + rounding + noise
    norm = _norm(arrays)
    if not norm <= bound:
        return (
            f"its norm {norm:.4g} exceeds {bound:.4g}, the most {contributors} inputs clipped "
            f"to {clip_norm:g} at total weight {total_weight:.4g} can sum to"
        )
    scalar_limit = contributors * (scalar_bound + scalar_unit)
    if len(scalars) and not np.all(np.abs(scalars) <= scalar_limit):
        return f"a summed scalar exceeds {scalar_limit:g} ({contributors} x {scalar_bound:g})"
    if clipped is not None and not -scalar_unit <= clipped <= contributors + scalar_unit:
        return f"its clipped count {clipped:g} is outside [0, {contributors}]"
    return None


def _norm(values: np.ndarray) -> float:
    """The L2 norm, without overflow for huge values."""
    if not len(values):
        return 0.0
    largest = float(np.max(np.abs(values)))
    if largest == 0 or not math.isfinite(largest):
        return largest
    scaled = values / largest
    return largest * math.sqrt(float(np.einsum("i,i->", scaled, scaled)))
