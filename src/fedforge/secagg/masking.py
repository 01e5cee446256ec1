"""What the mask step computes, for one client or a chunk of them at once (the same code:
a deployed client is a chunk of one).

- :class:`MaskParams`: the client's weight and the ring encoding, sent with the mask step.
- :func:`encode_input`: the kept record clipped, weighted, (rotated,) noised and encoded.
- :class:`PairKeys`: keys derived from X25519 agreements, each agreement computed once per
  pair of public keys among the clients of a chunk. The agreement of private key ``a``
  with public key ``B`` equals that of ``b`` with ``A`` when ``A`` and ``B`` are the public
  keys of ``a`` and ``b``; a client's own public key is the one it generated (kept in its
  session, never taken from the server), so the second client of a pair gets exactly the
  secret it would have computed itself.
- :func:`add_masks`: a chunk's masks expanded once per key (a pairwise mask is the same
  AES-256-CTR keystream at both ends of its pair) and added to or subtracted from each
  total that carries it, in the ring. The server removes masks with it too.
"""

from __future__ import annotations

import math
import os
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedforge.compress.rotation import rotate
from fedforge.core.keystream import KeystreamBuffer
from fedforge.privacy import discrete_gaussian
from fedforge.secagg import crypto, ring
from fedforge.secagg.protocol import ROTATION_BLOCK, rotation_seed

Masks = dict[bytes, list[tuple[int, int]]]  # mask key -> (row of the total, +1 or -1)


@dataclass(frozen=True)
class MaskParams:
    """What the server sends with the mask step: the client's weight and the encoding."""

    weight: float
    clip_norm: float
    ring_bits: int
    array_bits: int
    scalar_bits: int
    scalar_bound: float
    noise_units: float = 0.0  # distributed DP: discrete Gaussian stddev, in ring units
    rotation_block: int = 0  # > 0: records are rotated in blocks of this size first

    @classmethod
    def from_scalars(cls, scalars: Mapping[str, float]) -> MaskParams:
        try:
            p = cls(
                weight=float(scalars["secagg.weight"]),
                clip_norm=float(scalars["secagg.clip_norm"]),
                ring_bits=int(scalars["secagg.ring_bits"]),
                array_bits=int(scalars["secagg.array_bits"]),
                scalar_bits=int(scalars["secagg.scalar_bits"]),
                scalar_bound=float(scalars["secagg.scalar_bound"]),
                noise_units=float(scalars.get("secagg.noise_units", 0.0)),
                rotation_block=int(scalars.get("secagg.rotation_block", 0)),
            )
        except KeyError as exc:
            raise crypto.SecAggError(f"the mask step lacks {exc.args[0]!r}") from None
        if not 0 < p.weight <= 1 or not p.clip_norm > 0 or p.ring_bits not in (16, 32, 64):
            raise crypto.SecAggError("bad mask parameters (weight, clip norm or ring)")
        if not (p.noise_units == 0 or p.noise_units >= 0.5):  # Kairouz et al. need s >= 1/2
            raise crypto.SecAggError("bad noise level")
        if p.rotation_block not in (0, ROTATION_BLOCK):
            raise crypto.SecAggError("bad rotation block")
        if not -64 < p.array_bits <= 62 or not -64 < p.scalar_bits <= 62:
            raise crypto.SecAggError("bad fixed-point precision")
        return p

    def scalars(self) -> dict[str, float]:
        return {
            "secagg.weight": self.weight,
            "secagg.clip_norm": self.clip_norm,
            "secagg.ring_bits": float(self.ring_bits),
            "secagg.array_bits": float(self.array_bits),
            "secagg.scalar_bits": float(self.scalar_bits),
            "secagg.scalar_bound": self.scalar_bound,
            "secagg.noise_units": self.noise_units,
            "secagg.rotation_block": float(self.rotation_block),
        }


def encode_input(
    arrays: Sequence[np.ndarray],
    scalars: Sequence[float],
    params: MaskParams,
    context: bytes,
    seed: int,
    rounding: ring.Rounding | None = None,
) -> np.ndarray:
    """The record (its arrays and summed scalars, each in name order) clipped to the clip
    norm, times the weight, then its summed scalars and the clipped bit, as ring words;
    stochastic rounding draws from the client's stream (``seed``). ``rounding``: scratch
    reused across a chunk's records."""
    size = sum(int(a.size) for a in arrays)
    rounding = rounding or ring.Rounding()
    rounding.reserve(size)
    vector = rounding.values(size)
    if arrays:
        np.concatenate([np.ravel(a) for a in arrays], out=vector, casting="same_kind")
    norm = float(np.sqrt(np.einsum("i,i->", vector, vector)))  # no BLAS threads
    if not math.isfinite(norm):  # a NaN, an infinity, or values beyond 1e154
        raise crypto.SecAggError("the record holds a NaN, an infinity or a huge value")
    clipped = norm > params.clip_norm
    scale = params.weight * (params.clip_norm * (1 - 1e-9) / norm if clipped else 1.0)
    if params.rotation_block:
        shared_rotation = rotation_seed(context)  # the same for everyone
        vector = rotate((vector * scale)[None], [shared_rotation], params.rotation_block)[0]
        vector, scale = vector.astype(np.float64), 1.0
    # The clipped bit only without noise: under distributed DP it would be released bare.
    tail = np.array([*scalars, *([float(clipped)] if params.noise_units == 0 else [])])
    if not np.all(np.abs(tail) <= params.scalar_bound):
        raise crypto.SecAggError("a summed scalar is outside the ring's bound, or NaN")
    rng = np.random.default_rng(seed)  # stochastic rounding from the client's stream
    total = np.empty(len(vector) + len(tail), ring.ring_dtype(params.ring_bits))
    words = total[: len(vector)]
    rounding.encode(vector, params.array_bits, params.ring_bits, rng, words, scale)
    if params.noise_units > 0:  # distributed DP: integer noise, added before masking
        noise = discrete_gaussian.sample(params.noise_units, len(words), os.urandom(32))
        words += noise.view(np.uint64).astype(words.dtype)
    total[len(vector) :] = ring.encode(tail, params.scalar_bits, params.ring_bits, rng)
    return total


class PairKeys:
    """Keys from X25519 agreements, each computed once per unordered pair of public keys,
    purpose and session context (see the module docstring); live for one chunk's step."""

    def __init__(self) -> None:
        self._keys: dict[tuple[bytes, bytes, str, bytes], bytes] = {}

    def derive(
        self,
        own: X25519PrivateKey,
        own_public: bytes,
        peer_public: bytes,
        purpose: str,
        context: bytes,
    ) -> bytes:
        """``derive_key(agree(own, peer_public), purpose, context)``; ``own_public`` must be
        ``own``'s public key. SecAggError for a peer key of low order (never cached)."""
        pair = (min(own_public, peer_public), max(own_public, peer_public), purpose, context)
        key = self._keys.get(pair)
        if key is None:
            key = crypto.derive_key(crypto.agree(own, peer_public), purpose, context)
            self._keys[pair] = key
        return key


def add_masks(totals: list[np.ndarray], masks: Masks) -> None:
    """Add ``sign`` times the mask of each key to each listed total (ring words, all of one
    length and dtype, changed in place): every keystream is expanded once, however many
    totals carry it, and the keys are taken in an order that keeps the totals they touch
    in cache (ring addition commutes: the order changes nothing else)."""
    if not totals or not masks:
        return
    buffer = KeystreamBuffer(len(totals[0]), totals[0].dtype)
    for key in _local_order(masks):
        words = buffer.expand(key)
        for row, sign in masks[key]:
            if sign > 0:
                np.add(totals[row], words, out=totals[row])
            else:
                np.subtract(totals[row], words, out=totals[row])


def _local_order(masks: Masks) -> list[bytes]:
    """The keys by the first of their rows in a breadth-first walk of the graph whose
    edges are the masks two rows share: a pair's rows, and their neighbours', come close
    together (a chunk's graph is a ring, so this follows the ring)."""
    linked: dict[int, list[int]] = {}
    for users in masks.values():
        if len(users) == 2:
            (a, _), (b, _) = users
            linked.setdefault(a, []).append(b)
            linked.setdefault(b, []).append(a)
    place: dict[int, int] = {}
    for start in sorted({row for users in masks.values() for row, _ in users}):
        if start in place:
            continue
        place[start] = len(place)
        queue = deque([start])
        while queue:
            for other in linked.get(queue.popleft(), ()):
                if other not in place:
                    place[other] = len(place)
                    queue.append(other)
    return sorted(masks, key=lambda key: min(place[row] for row, _ in masks[key]))
