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

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np
import torch

from fedforge.core.errors import FedforgeError
from fedforge.core.params import Params
from fedforge.core.records import RecordBatch

Kind = Literal["mean", "gather", "secure_sum"]
ADD_BLOCK = 1 << 20  # elements per step of a record's float64 add


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
    # Every record's arrays stacked (row i: ``client_ids[i]``) and their weights, for an
    # algorithm whose update is not a function of the mean (exact LoRA: ``StackedRecords``).
    stacked: Params | None = None
    weights: np.ndarray | None = None


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


def rows_finite(flat: np.ndarray) -> np.ndarray:
    """Which rows of ``(n, d)`` hold only finite values. A finite row sum proves its row
    finite (NaN and infinities propagate), so only rows whose sum is not finite are checked
    element-wise."""
    if flat.dtype.kind != "f":
        return np.ones(len(flat), bool)
    if flat.flags.writeable and flat.dtype in (np.float32, np.float64):
        finite: np.ndarray = torch.isfinite(torch.from_numpy(flat).sum(dim=1)).numpy()
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            finite = np.isfinite(flat.sum(axis=1))
    for i in np.flatnonzero(~finite):
        finite[i] = bool(np.isfinite(flat[i]).all())
    return finite


def _tensor(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(a if a.flags.writeable else a.copy())


@dataclass(frozen=True)
class Summed:
    """The weighted sum of some records computed without decoding each one: per array name,
    the float64 sum shaped as the decoded array, and the decoded array's dtype."""

    sums: dict[str, torch.Tensor]
    dtypes: dict[str, np.dtype]


class StreamingMean:
    """Running weighted sum of record batches; ``result`` divides by the total weight.

    A batch of several records (a vectorized chunk) is summed with one matrix-vector product
    ``rows^T weights`` in the arrays' own dtype (torch's, several times NumPy's here); a
    single record is weighted in float64 exactly. Batch sums accumulate in float64, so memory
    stays O(model) and rounding does not grow with the number of clients.
    :meth:`add_finite` checks that the records are finite in the same pass.
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

    def _weights(self, batch: RecordBatch, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        w, capped = cap_weights(np.asarray(weights, np.float64), self.max_weight)
        if len(w) != len(batch) or np.any(w <= 0):
            raise ValueError("need one positive aggregation weight per record")
        return w, capped

    @staticmethod
    def _chunk_sum(flat: np.ndarray, w: np.ndarray) -> torch.Tensor:
        """``w @ flat`` of several rows in their own dtype (float64 for integers)."""
        if flat.dtype.kind != "f":
            return torch.from_numpy(w @ flat.astype(np.float64))
        rows = _tensor(flat)
        return torch.mv(rows.t(), torch.from_numpy(w.astype(flat.dtype)))

    def add(self, batch: RecordBatch, weights: np.ndarray) -> None:
        w, capped = self._weights(batch, weights)
        rows = len(batch)
        chunks: dict[str, torch.Tensor] = {}
        if rows > 1:
            for name, arr in batch.arrays.items():
                flat = arr.reshape(rows, -1)
                chunk = self._chunk_sum(flat, w)
                if not bool(torch.isfinite(chunk).all()):  # finite rows overflowed the sum
                    chunk = torch.from_numpy(w @ flat.astype(np.float64))
                chunks[name] = chunk
        self._commit(batch, w, capped, chunks)

    def add_summed(
        self, batch: RecordBatch, weights: np.ndarray, summer: Callable[[np.ndarray], Summed | None]
    ) -> bool:
        """Add the records whose weighted sum ``summer(capped weights)`` computes without
        materializing them (from their encoded form). False, adding nothing, when ``summer``
        cannot (None) or its sum is not finite (then decode and :meth:`add` the records)."""
        w, capped = self._weights(batch, weights)
        summed = summer(w)
        if summed is None or not all(bool(torch.isfinite(c).all()) for c in summed.sums.values()):
            return False
        self._commit(batch, w, capped, summed.sums, summed.dtypes)
        return True

    def add_finite(self, batch: RecordBatch, weights: np.ndarray) -> list[str | None]:
        """:meth:`add` of the rows whose arrays are all finite, checked in the same pass as
        the sum: with positive weights a finite sum proves every row finite (a NaN or an
        infinity in any row propagates), so rows are checked one by one only when it is
        not. Returns why each row was refused (None: added)."""
        w, capped = self._weights(batch, weights)
        rows = len(batch)
        chunks: dict[str, torch.Tensor] = {}
        fast = True
        for name, arr in batch.arrays.items():
            flat = arr.reshape(rows, -1)
            if rows == 1:  # one record: a dot product checks it, the add stays exact
                with np.errstate(over="ignore", invalid="ignore"):
                    square = np.dot(flat[0], flat[0]) if flat.dtype.kind == "f" else 0.0
                if not np.isfinite(square):  # (or huge: overflowed, checked again below)
                    fast = False
                    break
                continue
            chunk = self._chunk_sum(flat, w)
            if not bool(torch.isfinite(chunk).all()):
                fast = False
                break
            chunks[name] = chunk
        if fast:
            self._commit(batch, w, capped, chunks)
            return [None] * rows
        reasons: list[str | None] = [None] * rows
        for name, arr in batch.arrays.items():
            for i in np.flatnonzero(~rows_finite(arr.reshape(rows, -1))):
                reasons[i] = reasons[i] or f"{name}: NaN or infinite"
        keep = np.array([r is None for r in reasons])
        if keep.any():
            self.add(batch.select(keep), np.asarray(weights)[keep])
        return reasons

    def _commit(
        self,
        batch: RecordBatch,
        w: np.ndarray,
        capped: np.ndarray,
        chunks: dict[str, torch.Tensor],
        dtypes: dict[str, np.dtype] | None = None,
    ) -> None:
        """Add the batch: its precomputed ``chunks`` (the weighted sums of several rows, or
        of rows summed from their encoded form, whose ``dtypes`` are given), or its one row
        exactly."""
        self._downweighted.extend(int(c) for c in batch.client_ids[capped])
        if not self._sums:
            if dtypes is None:
                self._sums = {k: np.zeros(v.shape[1:], np.float64) for k, v in batch.arrays.items()}
                self._dtypes = {k: v.dtype for k, v in batch.arrays.items()}
            else:
                self._sums = {k: np.zeros(tuple(c.shape), np.float64) for k, c in chunks.items()}
                self._dtypes = dict(dtypes)
        rows = len(batch)
        for name, total in self._sums.items():
            target = torch.from_numpy(total.reshape(-1))
            if name in chunks:
                target.add_(chunks[name].reshape(-1))
            elif rows == 1:  # the product itself in float64, exactly (in blocks: the
                # promotion to float64 costs no copy of a large array)
                row = batch.arrays[name].reshape(-1)
                if row.dtype.kind != "f":
                    row = row.astype(np.float64)
                source = _tensor(row)
                for start in range(0, len(row), ADD_BLOCK):
                    end = start + ADD_BLOCK
                    target[start:end].add_(source[start:end], alpha=float(w[0]))
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
