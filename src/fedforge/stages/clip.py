"""Update clipping: each record's arrays scaled to L2 norm at most the round's clip norm.

The norm is over *all* arrays of the record together (everything the client releases), as
differential privacy needs. Each record carries the summed scalar ``clip.clipped`` (1 when it
was clipped), so the server learns how many clients were clipped, and nothing more.
:class:`FixedClip` keeps one norm; :class:`AdaptiveClip` (Andrew et al. 2021) moves it each
round toward a target quantile of the clients' update norms.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedforge.aggregate.kinds import Aggregate
from fedforge.compress.kernels import tiles
from fedforge.core.records import RecordBatch
from fedforge.stages.base import StageDefaults, StageState


def row_norms(batch: RecordBatch) -> np.ndarray:
    """L2 norm of each record over all its arrays, accumulated in float64 (a few rows at a
    time, so no float64 copy of the batch is made)."""
    squares = torch.zeros(len(batch), dtype=torch.float64)
    for arr in batch.arrays.values():
        flat = torch.from_numpy(np.ascontiguousarray(arr).reshape(len(batch), -1))
        for rows in tiles(len(batch), flat.shape[1], flat.device):
            squares[rows] += torch.linalg.vector_norm(flat[rows], dim=1, dtype=torch.float64) ** 2
    result: np.ndarray = np.sqrt(squares.numpy())
    return result


def clip_rows(batch: RecordBatch, norm: float) -> tuple[RecordBatch, np.ndarray]:
    """Scale every record to L2 norm <= ``norm``; return the batch and the clipped mask."""
    norms = row_norms(batch)
    clipped = norms > norm
    if not clipped.any():
        return batch, clipped
    # 1e-6 below the bound: float32 rounding (< 1e-7 relative) can never push a clipped
    # record past the norm that DP's sensitivity assumes.
    factor = np.where(clipped, norm * (1 - 1e-6) / np.maximum(norms, 1e-300), 1.0)
    arrays = {}
    for name, arr in batch.arrays.items():
        shape = (len(batch),) + (1,) * (arr.ndim - 1)
        arrays[name] = arr * factor.astype(arr.dtype).reshape(shape)
    return batch.replace_arrays(arrays), clipped


@dataclass(frozen=True)
class FixedClip(StageDefaults):
    norm: float
    name: str = "clip"
    position: str = "clip"
    commutes_with_sum: bool = True  # the server-side check is per record, before any sum
    report_clipped: bool = True  # local DP sends nothing it does not noise: no clipped bit
    recheck: bool = True  # re-clip on the server; not after client-side noise (local DP)

    def __post_init__(self) -> None:
        if not self.norm > 0:
            raise ValueError(f"clip norm must be > 0, got {self.norm}")

    def init_state(self) -> StageState:
        return {"norm": self.norm}

    def broadcast(self, state: StageState) -> dict[str, float]:
        return {f"{self.name}.norm": state["norm"]}

    def summed_scalars(self) -> tuple[str, ...]:
        return (f"{self.name}.clipped",) if self.report_clipped else ()

    def encode(
        self, batch: RecordBatch, broadcast: Mapping[str, float], seeds: Sequence[int]
    ) -> RecordBatch:
        clipped_batch, clipped = clip_rows(batch, broadcast[f"{self.name}.norm"])
        if not self.report_clipped:
            return clipped_batch
        return clipped_batch.with_scalars(**{f"{self.name}.clipped": clipped.astype(np.float64)})

    def decode(self, batch: RecordBatch, state: StageState) -> RecordBatch:
        """The server re-applies the bound (a no-op for honest clients; a client that skipped
        clipping is clipped here) and trusts no clipped bit outside {0, 1}. With client-side
        noise after the clip (local DP) the record's norm is the noise's: nothing to check."""
        if not self.recheck:
            return batch
        clipped_batch, clipped = clip_rows(batch, state["norm"])
        if not self.report_clipped:
            return clipped_batch
        key = f"{self.name}.clipped"
        reported = batch.scalars[key]
        bit = np.where(clipped, 1.0, np.clip(np.round(reported), 0.0, 1.0))
        return clipped_batch.with_scalars(**{key: bit})

    def finish_round(
        self, state: StageState, aggregate: Aggregate
    ) -> tuple[StageState, dict[str, float]]:
        metrics = {f"{self.name}.norm": state["norm"]}
        key = f"{self.name}.clipped"
        if key in aggregate.scalars:  # central DP withholds the count it does not noise
            metrics[key] = aggregate.scalars[key]
        return state, metrics


ADAPTIVE_FLOOR = 2.0**-20


@dataclass(frozen=True)
class AdaptiveClip(FixedClip):
    """Adaptive clipping (Andrew et al. 2021): after each round,
    ``norm *= exp(-learning_rate * (unclipped_fraction - target_quantile))``.

    The unclipped fraction is ``1 - clipped / clients``; under central DP the clipped count
    arrives noised and ``clients`` is the *expected* number of clients (``expected_clients``),
    never the realized one, so the norm is a function of released values only. It never
    falls below ``ADAPTIVE_FLOOR`` times its start (secure aggregation's rounding error is
    bounded relative to the norm down to there: ``privacy/guards.py``)."""

    target_quantile: float = 0.5
    learning_rate: float = 0.2
    expected_clients: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.target_quantile <= 1:
            raise ValueError(f"target quantile must be in [0, 1], got {self.target_quantile}")
        if not self.learning_rate > 0:
            raise ValueError(f"clip learning rate must be > 0, got {self.learning_rate}")

    def finish_round(
        self, state: StageState, aggregate: Aggregate
    ) -> tuple[StageState, dict[str, float]]:
        _, metrics = super().finish_round(state, aggregate)
        clients = self.expected_clients or aggregate.count
        clipped = aggregate.scalars[f"{self.name}.clipped"]
        unclipped = min(max(1.0 - clipped / clients, 0.0), 1.0)
        norm = state["norm"] * math.exp(-self.learning_rate * (unclipped - self.target_quantile))
        norm = max(norm, self.norm * ADAPTIVE_FLOOR)  # a public function of released values
        metrics[f"{self.name}.unclipped_fraction"] = unclipped
        return {"norm": norm}, metrics
