"""The gather aggregation kind: keep the round's records, then apply one robust rule.

Records are flattened (every array of a record, in name order, as one row) into an (n, d)
stack; the rule (``aggregate/robust.py``) returns one row, which is split back into arrays in
their own dtypes. The rows a rule excluded or down-weighted are reported by client id, so the
history says whom each round distrusted. Summed scalars are still summed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedforge.aggregate import robust
from fedforge.aggregate.kinds import Aggregate, Aggregation, Kind, add_scalars
from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.core.records import RecordBatch

Rule = Literal[
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
    "bulyan",
    "geometric_median",
    "norm_bound",
    "centered_clipping",
    "fedpg_br",
]
BOUNDED_RULES = ("trimmed_mean", "krum", "multi_krum", "bulyan")  # need a known cohort size
# Rules whose result is a convex combination of whole records: a value averaged beside the
# update in the same record (FedNova's step count, q-FedAvg's h) stays paired with it.
WHOLE_RECORD_RULES = ("krum", "multi_krum", "geometric_median")


@dataclass(frozen=True)
class RobustAggregation:
    """A robust rule with its parameters; ``byzantine`` is the f it must tolerate.

    ``centered_clipping`` starts from zero (the aggregate is a model delta) and iterates
    ``iterations`` times with radius ``tau``."""

    rule: Rule = "median"
    byzantine: int = 0
    beta: float = 0.1  # trimmed_mean: share trimmed at each end
    multi: int = 1  # multi_krum: rows averaged
    max_norm: float | None = None  # norm_bound: fixed bound ...
    quantile: float | None = None  # ... or this quantile of the round's norms
    tau: float = 1.0  # centered_clipping: radius
    iterations: int = 3  # centered_clipping: iterations
    sigma: float = 0.06  # fedpg_br: bound on one trajectory's gradient deviation
    delta: float = 0.6  # fedpg_br: the filter's failure probability
    alpha: float = 0.3  # fedpg_br: the faulty share tolerated (< 0.5)
    batch_size: int = 1  # fedpg_br: trajectories behind each report (B)
    kind: Kind = "gather"

    @property
    def name(self) -> str:
        return self.rule

    def check(self, n: int) -> None:
        """Refuse a cohort of ``n`` this rule cannot defend with ``byzantine`` attackers."""
        if self.rule in BOUNDED_RULES:
            base = {"multi_krum": "krum", "median": "coordinate_median"}.get(self.rule, self.rule)
            robust.check_bounds(
                base,
                n,
                self.byzantine,
                m=self.multi if self.rule == "multi_krum" else 1,
                beta=self.beta if self.rule == "trimmed_mean" else None,
            )

    def apply(self, rows: np.ndarray, weights: np.ndarray) -> robust.RobustResult:
        """The rule on an (n, d) stack of flattened records."""
        self.check(len(rows))
        if self.rule == "median":
            return robust.coordinate_median(rows)
        if self.rule == "trimmed_mean":
            return robust.trimmed_mean(rows, self.beta)
        if self.rule in ("krum", "multi_krum"):
            return robust.krum(rows, self.byzantine, self.multi if self.rule == "multi_krum" else 1)
        if self.rule == "bulyan":
            return robust.bulyan(rows, self.byzantine)
        if self.rule == "geometric_median":
            return robust.geometric_median(rows, weights)
        if self.rule == "norm_bound":
            return robust.norm_bound(rows, weights, self.max_norm, self.quantile)
        if self.rule == "fedpg_br":  # FedPG-BR's gradient filter (Fan et al. 2021)
            from fedforge.rl.fedpg_br import byzantine_filter

            return byzantine_filter(rows, self.sigma, self.batch_size, self.delta, self.alpha)
        center = np.zeros(rows.shape[1])
        return robust.centered_clipping(rows, weights, center, self.tau, self.iterations)

    def accumulator(self) -> Gather:
        return Gather(self.rule, self.apply)


@dataclass(frozen=True)
class CoordinateMedian(RobustAggregation):
    """Coordinate-wise median of the records (Yin et al. 2018); ignores weights."""

    rule: Rule = "median"


def combines_whole_records(aggregation: Aggregation) -> bool:
    """Whether ``aggregation``'s result is a convex combination of whole records (the mean,
    Krum, Multi-Krum, the geometric median), not per coordinate or rescaled (the median,
    trimmed mean, Bulyan, norm bounding, centered clipping, secure aggregation's clip)."""
    inner = getattr(aggregation, "inner", None)  # a simulated attack wrapping the rule
    if inner is not None:
        return combines_whole_records(inner)
    if aggregation.kind == "mean":
        return True
    return aggregation.kind == "gather" and getattr(aggregation, "rule", None) in WHOLE_RECORD_RULES


def is_mean(aggregation: Aggregation) -> bool:
    """Whether ``aggregation`` is the weighted mean of every accepted record (possibly under
    a simulated attack that replaces the attackers' records)."""
    inner = getattr(aggregation, "inner", None)
    return is_mean(inner) if inner is not None else aggregation.kind == "mean"


def flatten(batches: list[RecordBatch]) -> tuple[np.ndarray, list[str]]:
    """The records of ``batches`` as one (n, d) stack, arrays in name order."""
    names = sorted(batches[0].arrays)
    rows = np.concatenate(
        [np.concatenate([b.arrays[k].reshape(len(b), -1) for k in names], axis=1) for b in batches]
    )
    return rows, names


def unflatten(row: np.ndarray, like: RecordBatch, names: list[str]) -> dict[str, np.ndarray]:
    """Split one flat row into arrays shaped and typed like ``like``'s records."""
    out, start = {}, 0
    for name in names:
        template = like.arrays[name]
        size = int(np.prod(template.shape[1:], dtype=np.int64))
        out[name] = row[start : start + size].reshape(template.shape[1:]).astype(template.dtype)
        start += size
    return out


Combine = Callable[[np.ndarray, np.ndarray], robust.RobustResult]
Transform = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (rows, client ids) -> rows


class Gather:
    """Keeps every record of the round (copied: a runtime may reuse a batch's storage), then
    ``combine``s the stack (after ``transform``, which simulated omniscient attacks use to
    see every honest row)."""

    def __init__(self, name: str, combine: Combine, transform: Transform | None = None) -> None:
        self.name, self.combine, self.transform = name, combine, transform
        self.batches: list[RecordBatch] = []
        self.weights: list[np.ndarray] = []
        self.count = 0

    def add(self, batch: RecordBatch, weights: np.ndarray) -> None:
        self.batches.append(batch.replace_arrays({k: v.copy() for k, v in batch.arrays.items()}))
        self.weights.append(np.asarray(weights, np.float64))
        self.count += len(batch)

    def result(self) -> Aggregate:
        if self.count == 0:
            raise FedforgeError("no record was aggregated")
        rows, names = flatten(self.batches)
        weights = np.concatenate(self.weights)
        ids = np.concatenate([b.client_ids for b in self.batches]).astype(np.int64)
        if self.transform is not None:
            rows = self.transform(rows, ids)
        try:
            result = self.combine(rows, weights)
        except ConfigError as exc:  # fewer records than the rule needs (dropouts)
            raise FedforgeError(f"{self.name} cannot aggregate this round: {exc}") from None
        scalars: dict[str, float] = {}
        for b in self.batches:
            add_scalars(scalars, b)
        return Aggregate(
            unflatten(result.update, self.batches[0], names),
            scalars,
            self.count,
            float(weights.sum()),
            excluded=sorted(int(i) for i in ids[result.excluded]),
            downweighted=sorted(int(i) for i in ids[result.downweighted]),
            client_ids=[int(i) for i in ids],
        )
