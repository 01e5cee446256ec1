"""Who shares secrets with whom: SecAgg+'s random k-regular graph (Bell et al. 2020).

The participants are placed on a ring in a random order (sorted by SHA-256 of a 32-byte seed
and their id) from a seed that the
server announces *before* any client has advertised keys, so it cannot pick the graph after
seeing them; each client is joined to the ``degree / 2`` clients on each side (a Harary
graph). Every client recomputes its own neighbours from the seed and the participant list.
With ``degree >= n - 1`` it is the complete graph (classic SecAgg, Bonawitz et al. 2017).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np


def default_degree(num_clients: int, security: float) -> int:
    """``security * log2(n)`` rounded up to an even number, at most ``n - 1`` (complete)."""
    if num_clients <= 1:
        return 0
    k = math.ceil(security * math.log2(num_clients))
    k += k % 2
    return min(k, num_clients - 1)


def neighbours(participants: Sequence[int], degree: int, seed: bytes) -> dict[int, list[int]]:
    """Each participant's neighbours (sorted, without itself)."""
    ring = _ring(participants, degree, seed)
    return {int(c): _around(ring, p, degree) for p, c in enumerate(ring)}


def neighbours_of(client: int, participants: Sequence[int], degree: int, seed: bytes) -> list[int]:
    """One participant's neighbours: what a client computes for itself."""
    ring = _ring(participants, degree, seed)
    where = np.flatnonzero(ring == client)
    if len(where) != 1:
        raise ValueError(f"client {client} is not a participant")
    return _around(ring, int(where[0]), degree)


def _ring(participants: Sequence[int], degree: int, seed: bytes) -> np.ndarray:
    """The participants in ring order (sorted for the complete graph)."""
    return _cached_ring(tuple(sorted(int(p) for p in participants)), degree, seed)


@lru_cache(maxsize=8)
def _cached_ring(ids_sorted: tuple[int, ...], degree: int, seed: bytes) -> np.ndarray:
    """The ring, computed once for the many clients of one session that one process
    answers for (read only: it is shared)."""
    ids = np.array(ids_sorted, np.int64)
    if len(np.unique(ids)) != len(ids):
        raise ValueError("participants must be distinct")
    if degree >= len(ids) - 1:
        ids.setflags(write=False)
        return ids
    if degree < 2 or degree % 2:
        raise ValueError(f"a sparse graph needs an even degree >= 2, got {degree}")
    # Sorted by SHA-256(seed | id): the same order for every client, whatever its NumPy.
    digests = [
        hashlib.sha256(seed + int(c).to_bytes(8, "little", signed=True)).digest() for c in ids
    ]
    ring = ids[np.array(sorted(range(len(ids)), key=digests.__getitem__), np.int64)]
    ring.setflags(write=False)
    return ring


def _around(ring: np.ndarray, position: int, degree: int) -> list[int]:
    n = len(ring)
    if degree >= n - 1:
        return [int(c) for c in ring if c != ring[position]]
    half = degree // 2
    return sorted(int(ring[(position + d) % n]) for d in range(-half, half + 1) if d != 0)
