"""Weighted mean of client updates, as a pure function and as a streaming accumulator."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedforge.core.errors import FedforgeError
from fedforge.core.params import Params


def weighted_mean(updates: np.ndarray, weights: Sequence[float] | np.ndarray) -> np.ndarray:
    """Mean of ``updates`` (stacked along axis 0) weighted by ``weights``, in float64."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or len(w) != len(updates):
        raise ValueError(f"need one weight per update: {len(updates)} updates, weights {w.shape}")
    if np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative with a positive sum")
    stacked = np.asarray(updates, dtype=np.float64)
    mean: np.ndarray = np.tensordot(w, stacked, axes=1) / w.sum()
    return mean


class StreamingMean:
    """Running weighted sum of updates: memory O(model), whatever the number of clients.

    Sums are kept in float64 (widened block by block, so no model-sized temporary is ever
    allocated) and cast back to each array's dtype by :meth:`result`.
    """

    BLOCK = 1 << 18  # elements widened per step

    def __init__(self) -> None:
        self._sums: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._scratch = np.empty(0, np.float64)
        self.total_weight = 0.0
        self.count = 0

    def add(self, update: Params, weight: float) -> None:
        if weight <= 0:
            raise ValueError(f"aggregation weight must be positive, got {weight}")
        if not self._sums:
            self._sums = {k: np.zeros(v.shape, np.float64) for k, v in update.items()}
            self._dtypes = {k: v.dtype for k, v in update.items()}
            largest = max((v.size for v in update.values()), default=0)
            self._scratch = np.empty(min(largest, self.BLOCK), np.float64)
        for name, total in self._sums.items():
            flat_total, flat_update = total.reshape(-1), update[name].reshape(-1)
            for start in range(0, flat_total.size, self.BLOCK):
                stop = min(start + self.BLOCK, flat_total.size)
                scratch = self._scratch[: stop - start]
                # weight * update, computed in float64 (no rounding to the update's dtype).
                np.multiply(flat_update[start:stop], weight, out=scratch, dtype=np.float64)
                flat_total[start:stop] += scratch
        self.total_weight += weight
        self.count += 1

    def result(self) -> Params:
        if self.count == 0:
            raise FedforgeError("no update was aggregated")
        out = {}
        for name, total in self._sums.items():
            mean = np.empty(total.shape, self._dtypes[name])
            np.divide(total, self.total_weight, out=mean, casting="same_kind")
            out[name] = mean
        return out
