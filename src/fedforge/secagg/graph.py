"""Who shares secrets with whom: SecAgg+'s random k-regular graph (Bell et al. 2020).

The participants are placed on a ring in a random order drawn from a 32-byte seed that the
server announces *before* any client has advertised keys, so it cannot pick the graph after
seeing them; each client is joined to the ``degree / 2`` clients on each side (a Harary
graph). Every client recomputes its own neighbours from the seed and the participant list.
With ``degree >= n - 1`` it is the complete graph (classic SecAgg, Bonawitz et al. 2017).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
    ids = sorted(int(p) for p in participants)
    n = len(ids)
    if len(set(ids)) != n:
        raise ValueError("participants must be distinct")
    if degree >= n - 1:
        return {c: [o for o in ids if o != c] for c in ids}
    if degree < 2 or degree % 2:
        raise ValueError(f"a sparse graph needs an even degree >= 2, got {degree}")
    order = np.random.default_rng(np.frombuffer(seed, np.uint32)).permutation(ids)
    position = {int(c): i for i, c in enumerate(order)}
    half = degree // 2
    out = {}
    for c in ids:
        p = position[c]
        out[c] = sorted(int(order[(p + d) % n]) for d in range(-half, half + 1) if d != 0)
    return out
