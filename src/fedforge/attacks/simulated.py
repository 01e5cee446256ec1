"""Attacks wired into a simulated run: a seeded set of attacker clients, and for each attack
the seam it uses, so an attacked run still runs on every runtime, vectorized included.

- data poisoning (``label_flip``, ``backdoor``): the attackers' training data is transformed
  before the run; they then train honestly on it;
- update poisoning (``sign_flip``, ``scaled``, ``gaussian``): :class:`ModelPoisoning`, a
  client-side stage that rewrites the attackers' records before they leave;
- omniscient poisoning (``alie``, ``ipm``): the attacks assume the attackers know the honest
  updates of the round, so they are applied where all records meet: :class:`Omniscient` wraps
  the aggregation, replaces the attackers' rows using the honest rows, then aggregates;
- lying about the sample count (``attack.overclaim``, with any attack): :class:`Overclaim`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from fedforge.aggregate.gather import Gather, RobustAggregation
from fedforge.aggregate.kinds import Aggregation, Kind, WeightedMean, cap_weights, weighted_mean
from fedforge.aggregate.robust import RobustResult
from fedforge.attacks import updates
from fedforge.core.records import RecordBatch
from fedforge.stages.base import StageDefaults

UpdateAttack = Literal["sign_flip", "scaled", "gaussian"]
OmniscientAttack = Literal["alie", "ipm"]


def choose_attackers(num_clients: int, fraction: float, rng: np.random.Generator) -> frozenset[int]:
    """``round(fraction * num_clients)`` distinct client ids, drawn by ``rng``."""
    count = round(fraction * num_clients)
    return frozenset(int(c) for c in rng.choice(num_clients, size=count, replace=False))


@dataclass(frozen=True)
class Overclaim(StageDefaults):
    """The attackers claim ``factor`` times their example count, for a larger aggregation
    weight. The server holds every claim to the client's cap (its data size in simulation,
    the operator's or the declared size in deployment), so an inflated claim is rejected;
    ``aggregation.max_weight`` bounds what a claim within the cap can buy."""

    attackers: frozenset[int]
    factor: float
    name: str = "overclaim"
    position: str = "attack"
    commutes_with_sum: bool = True

    def encode(
        self, batch: RecordBatch, broadcast: Mapping[str, float], seeds: Sequence[int]
    ) -> RecordBatch:
        rows = np.isin(batch.client_ids, list(self.attackers))
        if not rows.any():
            return batch
        claimed = batch.num_examples.copy()
        claimed[rows] = np.ceil(claimed[rows] * self.factor).astype(claimed.dtype)
        return replace(batch, num_examples=claimed)


@dataclass(frozen=True)
class ModelPoisoning(StageDefaults):
    """The attackers' records, rewritten on the client: ``sign_flip`` (-scale x update),
    ``scaled`` (scale x update, model replacement) or ``gaussian`` (noise of stddev ``std``,
    drawn from the task seed)."""

    attackers: frozenset[int]
    attack: UpdateAttack
    scale: float = 1.0
    std: float = 1.0
    name: str = "attack"
    position: str = "attack"
    commutes_with_sum: bool = True

    def encode(
        self, batch: RecordBatch, broadcast: Mapping[str, float], seeds: Sequence[int]
    ) -> RecordBatch:
        rows = np.flatnonzero(np.isin(batch.client_ids, list(self.attackers)))
        if not len(rows):
            return batch
        arrays = {}
        for index, (name, arr) in enumerate(sorted(batch.arrays.items())):
            out = arr.copy()
            own = arr[rows].reshape(len(rows), -1)
            if self.attack == "sign_flip":
                poisoned = updates.sign_flip(own, self.scale)
            elif self.attack == "scaled":
                poisoned = updates.scaled(own, self.scale)
            else:
                poisoned = np.concatenate(
                    [
                        updates.gaussian(
                            (1, own.shape[1]),
                            self.std,
                            np.random.default_rng([seeds[int(row)], index]),
                            arr.dtype,
                        )
                        for row in rows
                    ]
                )
            out[rows] = poisoned.reshape(own.shape[:1] + arr.shape[1:])
            arrays[name] = out
        return batch.replace_arrays(arrays)


@dataclass(frozen=True)
class Omniscient:
    """``inner`` aggregation after the attackers' rows are replaced by ALIE or IPM computed
    from the round's honest rows (Baruch et al. 2019; Xie et al. 2019)."""

    inner: Aggregation
    attackers: frozenset[int]
    attack: OmniscientAttack
    epsilon: float = 0.5  # ipm
    kind: Kind = "gather"

    @property
    def name(self) -> str:
        return f"{self.inner.name} under {self.attack}"

    def poison(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        bad = np.isin(ids, list(self.attackers))
        honest = rows[~bad]
        if not bad.any() or len(honest) < 2:
            return rows
        rows = rows.copy()
        count = int(bad.sum())
        if self.attack == "alie":
            rows[bad] = updates.little_is_enough(honest, count, num_clients=len(rows))
        else:
            rows[bad] = updates.inner_product_manipulation(honest, self.epsilon, count)
        return rows

    def combine(self, rows: np.ndarray, weights: np.ndarray) -> RobustResult:
        if isinstance(self.inner, RobustAggregation):
            return self.inner.apply(rows, weights)
        assert isinstance(self.inner, WeightedMean)
        capped, clamped = cap_weights(weights, self.inner.max_weight)
        none = np.zeros(0, np.int64)
        return RobustResult(weighted_mean(rows, capped), none, np.flatnonzero(clamped))

    def accumulator(self) -> Gather:
        return Gather(self.name, self.combine, self.poison)
