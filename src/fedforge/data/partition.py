"""Partitioners: pure functions from labels to one index array per client.

Every partitioner gives every client at least one example, uses every example exactly once,
and is deterministic given its generator.
"""

from __future__ import annotations

import heapq

import numpy as np

from fedforge.core.errors import DataError

Partition = list[np.ndarray]


def _check(n: int, num_clients: int) -> None:
    if num_clients < 1:
        raise DataError(f"num_clients must be >= 1, got {num_clients}")
    if n < num_clients:
        raise DataError(
            f"cannot give each of {num_clients} clients an example: the dataset has only {n}"
        )


def _fill_empty(parts: list[list[int]] | list[np.ndarray]) -> Partition:
    """Move one example from the currently largest client to each empty one."""
    out = [np.asarray(p, dtype=np.int64) for p in parts]
    empty = [i for i, part in enumerate(out) if len(part) == 0]
    if empty:
        donors = [(-len(part), i) for i, part in enumerate(out) if len(part) > 1]
        heapq.heapify(donors)
        for i in empty:
            _, donor = heapq.heappop(donors)
            out[i], out[donor] = out[donor][-1:], out[donor][:-1]
            if len(out[donor]) > 1:
                heapq.heappush(donors, (-len(out[donor]), donor))
    return [np.sort(p) for p in out]


def iid(num_examples: int, num_clients: int, rng: np.random.Generator) -> Partition:
    """Shuffle and deal the examples into near-equal parts."""
    _check(num_examples, num_clients)
    return [np.sort(p) for p in np.array_split(rng.permutation(num_examples), num_clients)]


def dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> Partition:
    """Label skew: each class is split over clients with proportions drawn from Dir(alpha).

    Small alpha gives each client few classes; large alpha approaches IID.
    """
    _check(len(labels), num_clients)
    if alpha <= 0:
        raise DataError(f"dirichlet alpha must be > 0, got {alpha}")
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        shares = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(members)).astype(np.int64)
        for client, chunk in enumerate(np.split(members, cuts)):
            parts[client].extend(chunk.tolist())
    return _fill_empty(parts)


def shards(
    labels: np.ndarray, num_clients: int, shards_per_client: int, rng: np.random.Generator
) -> Partition:
    """The FedAvg paper's pathological split: label-sorted shards, k per client.

    Shards never straddle two labels, so each client holds at most ``shards_per_client``
    labels. Shards are allotted to labels in proportion to the label's frequency.
    """
    _check(len(labels), num_clients)
    if shards_per_client < 1:
        raise DataError(f"shards_per_client must be >= 1, got {shards_per_client}")
    classes, counts = np.unique(labels, return_counts=True)
    total = num_clients * shards_per_client
    if total < len(classes):
        raise DataError(
            f"{total} shards cannot cover {len(classes)} labels; raise num_clients or "
            "shards_per_client"
        )
    # One shard per label, the rest by largest remainder of the label frequencies.
    extra = (total - len(classes)) * counts / counts.sum()
    per_label = 1 + np.floor(extra).astype(np.int64)
    for i in np.argsort(-(extra - np.floor(extra)), kind="stable")[: total - per_label.sum()]:
        per_label[i] += 1
    if np.any(per_label > counts):
        raise DataError("too many shards for the examples of some label; lower the shard count")
    pieces: list[np.ndarray] = []
    for label, k in zip(classes, per_label, strict=True):
        members = rng.permutation(np.flatnonzero(labels == label))
        pieces.extend(np.array_split(members, int(k)))
    order = rng.permutation(total)
    return [
        np.sort(np.concatenate([pieces[s] for s in order[c::num_clients]]))
        for c in range(num_clients)
    ]


def quantity_skew(
    num_examples: int, num_clients: int, exponent: float, rng: np.random.Generator
) -> Partition:
    """Quantity skew: client sizes follow a power law (Pareto weights with this exponent).

    Labels stay IID; only how many examples each client holds varies. Smaller exponents
    give heavier tails (a few very large clients).
    """
    _check(num_examples, num_clients)
    if exponent <= 0:
        raise DataError(f"quantity_skew exponent must be > 0, got {exponent}")
    weights = rng.pareto(exponent, num_clients) + 1.0
    sizes = 1 + rng.multinomial(num_examples - num_clients, weights / weights.sum())
    cuts = np.cumsum(sizes)[:-1]
    return [np.sort(p) for p in np.split(rng.permutation(num_examples), cuts)]


def label_counts(labels: np.ndarray, partition: Partition, num_classes: int) -> np.ndarray:
    """A (clients x classes) matrix of example counts."""
    return np.stack([np.bincount(labels[p], minlength=num_classes) for p in partition])
