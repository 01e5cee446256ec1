"""The ``gather`` kind for algorithms that need every record, not one combination of them:
the aggregate carries the weighted mean (as the ``mean`` kind) and, beside it, every record's
arrays stacked with their weights (``Aggregate.stacked``, ``Aggregate.weights``).

Exact LoRA aggregation is such an algorithm: its update is the mean of the products
``B_k A_k`` of each record's factors, which no sum of the records' arrays gives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedforge.aggregate.kinds import Aggregate, Kind, StreamingMean
from fedforge.core.errors import FedforgeError
from fedforge.core.records import RecordBatch


class KeepAll:
    """Keeps every record (copied: a runtime may reuse a batch's storage) beside the
    streaming mean of them."""

    def __init__(self) -> None:
        self.mean = StreamingMean()
        self.batches: list[RecordBatch] = []
        self.weights: list[np.ndarray] = []
        self.count = 0

    def add(self, batch: RecordBatch, weights: np.ndarray) -> None:
        self.mean.add(batch, weights)
        self.count = self.mean.count
        self.batches.append(batch.replace_arrays({k: v.copy() for k, v in batch.arrays.items()}))
        self.weights.append(np.asarray(weights, np.float64))

    def result(self) -> Aggregate:
        if self.count == 0:
            raise FedforgeError("no record was aggregated")
        names = self.batches[0].arrays
        stacked = {n: np.concatenate([b.arrays[n] for b in self.batches]) for n in names}
        return replace(self.mean.result(), stacked=stacked, weights=np.concatenate(self.weights))


@dataclass(frozen=True)
class StackedRecords:
    """Every record, stacked, for the algorithm's server update (see the module docstring)."""

    name: str = "stacked"
    kind: Kind = "gather"

    def accumulator(self) -> KeepAll:
        return KeepAll()
