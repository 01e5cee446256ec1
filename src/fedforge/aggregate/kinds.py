"""Aggregation kinds: how accepted records become one aggregate.

- ``mean``: a streaming weighted mean (memory O(model), whatever the number of clients); a
  batch of records is summed with one matrix product per block of coordinates.
- ``gather``: all records are kept for aggregators that need them together (robust rules in
  ``aggregate/gather.py``, exact LoRA); they report which clients they excluded or
  down-weighted.
- ``secure_sum``: the server only ever sees the sum (secure aggregation fills this kind);
  only stages that commute with summation may sit before it.

Summed scalars (a clipped bit, a step count) are summed beside the arrays by every kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

from fedforge.core.errors import FedforgeError
from fedforge.core.params import Params
from fedforge.core.records import RecordBatch

Kind = Literal["mean", "gather", "secure_sum"]


@dataclass(frozen=True)
class Aggregate:
    """The round's aggregate: arrays (a mean or a robust estimate), the sums of the summed
    scalars, how many records were used, whose (``client_ids``), and which clients were
    excluded or down-weighted."""

    arrays: Params
    scalars: dict[str, float]
    count: int
    total_weight: float
    excluded: list[int] = field(default_factory=list)
    downweighted: list[int] = field(default_factory=list)
    client_ids: list[int] = field(default_factory=list)
    # Clients whose record reached the server but is not in the sum (rejected, or in a refused
    # round): local DP's ledger counts them too.
    unsummed: list[int] = field(default_factory=list)


class Accumulator(Protocol):
    """Sums (or collects) record batches. A runtime may reuse a batch's storage once ``add``
    returns, so an accumulator that keeps records must copy them."""

    count: int

    def add(self, batch: RecordBatch, weights: np.ndarray) -> None: ...

    def result(self) -> Aggregate: ...


class Aggregation(Protocol):
    """A factory of per-round accumulators; ``kind`` decides what stages may precede it."""

    @property
    def kind(self) -> Kind: ...

    @property
    def name(self) -> str: ...

    def accumulator(self) -> Accumulator: ...


def add_scalars(totals: dict[str, float], batch: RecordBatch) -> None:
    """Add a batch's summed scalars (a clipped bit, a step count) to ``totals``."""
    for key, values in batch.scalars.items():
        totals[key] = totals.get(key, 0.0) + float(values.sum())


def cap_weights(weights: np.ndarray, max_weight: float | None) -> tuple[np.ndarray, np.ndarray]:
    """Weights clamped to ``max_weight``; and the mask of rows that were clamped."""
    if max_weight is None:
        return weights, np.zeros(len(weights), bool)
    capped = weights > max_weight
    return np.minimum(weights, max_weight), capped


def weighted_mean(updates: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Mean of ``updates`` (stacked along axis 0) weighted by ``weights``, in float64."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != len(updates):
        raise ValueError(f"need one weight per update: {len(updates)} updates, weights {w.shape}")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    mean: np.ndarray = np.tensordot(w, np.asarray(updates, dtype=np.float64), axes=1) / w.sum()
    return mean


class StreamingMean:
    """Running weighted sum of record batches; ``result`` divides by the total weight.

    A batch of several records (a vectorized chunk) is summed with one matrix product
    ``weights @ rows`` in the arrays' own dtype (BLAS accumulates at most a chunk's rows); a
    single record is weighted in float64 exactly. Batch sums accumulate in float64, so memory
    stays O(model) and rounding does not grow with the number of clients.
    """

    def __init__(self, max_weight: float | None = None) -> None:
        self.max_weight = max_weight
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._scalars: dict[str, float] = {}
        self._downweighted: list[int] = []
        self._client_ids: list[int] = []
        self.total_weight = 0.0
        self.count = 0

    def add(self, batch: RecordBatch, weights: np.ndarray) -> None:
        w, capped = cap_weights(np.asarray(weights, np.float64), self.max_weight)
        if len(w) != len(batch) or np.any(w <= 0):
            raise ValueError("need one positive aggregation weight per record")
        self._downweighted.extend(int(c) for c in batch.client_ids[capped])
        if not self._sums:
            self._sums = {k: np.zeros(v.shape[1:], np.float64) for k, v in batch.arrays.items()}
            self._dtypes = {k: v.dtype for k, v in batch.arrays.items()}
        rows = len(batch)
        for name, total in self._sums.items():
            flat = batch.arrays[name].reshape(rows, -1)
            if rows == 1:  # one record: the product itself in float64, exactly
                total.reshape(-1)[:] += np.multiply(flat[0], w[0], dtype=np.float64)
            else:
                chunk = w.astype(flat.dtype) @ flat
                if not np.isfinite(chunk).all():  # finite rows overflowed the narrow sum
                    chunk = w @ flat.astype(np.float64)
                total.reshape(-1)[:] += chunk
        add_scalars(self._scalars, batch)
        self._client_ids.extend(int(c) for c in batch.client_ids)
        self.total_weight += float(w.sum())
        self.count += rows

    def result(self) -> Aggregate:
        if self.count == 0:
            raise FedforgeError("no record was aggregated")
        arrays = {}
        for name, total in self._sums.items():
            mean = np.empty(total.shape, self._dtypes[name])
            np.divide(total, self.total_weight, out=mean, casting="same_kind")
            arrays[name] = mean
        return Aggregate(
            arrays,
            dict(self._scalars),
            self.count,
            self.total_weight,
            downweighted=list(self._downweighted),
            client_ids=list(self._client_ids),
        )


@dataclass(frozen=True)
class WeightedMean:
    """Weighted mean of the records; ``max_weight`` caps the weight one client can carry."""

    max_weight: float | None = None
    kind: Kind = "mean"
    name: str = "mean"

    def accumulator(self) -> StreamingMean:
        return StreamingMean(self.max_weight)
