"""Update clipping: each record's arrays scaled to L2 norm at most the round's clip norm.

The norm is over *all* arrays of the record together (everything the client releases), as
differential privacy needs. Each record carries the summed scalar ``clip.clipped`` (1 when it
was clipped), so the server learns how many clients were clipped, and nothing more.
:class:`FixedClip` keeps one norm; :class:`AdaptiveClip` (Andrew et al. 2021) moves it each
round toward a target quantile of the clients' update norms.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

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
    return clip_to_norms(batch, norm, row_norms(batch))


def clip_to_norms(
    batch: RecordBatch, norm: float, norms: np.ndarray
) -> tuple[RecordBatch, np.ndarray]:
    """:func:`clip_rows` of records whose L2 norms are ``norms``."""
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


def _identity(batch: RecordBatch) -> tuple[int, ...]:
    return tuple(id(a) for a in batch.arrays.values())


@dataclass(frozen=True)
class _Bounded:
    """Records this stage object clipped itself, in this process: their arrays (weakly: the
    very objects, not equal copies) and the bound their rows are known to be within."""

    arrays: tuple[weakref.ref[np.ndarray], ...]
    bound: float

    def holds(self, batch: RecordBatch) -> bool:
        current = tuple(batch.arrays.values())
        return len(current) == len(self.arrays) and all(
            ref() is a for ref, a in zip(self.arrays, current, strict=True)
        )


class _ClippedHere(dict[tuple[int, ...], _Bounded]):
    """:class:`_Bounded` batches by their arrays' ids. A copy (pickled for another process,
    deep-copied) starts empty: what one object clipped says nothing about another's."""

    def __reduce__(self) -> tuple[type[_ClippedHere], tuple[()]]:
        return (_ClippedHere, ())


@dataclass(frozen=True)
class FixedClip(StageDefaults):
    """Scale each record to L2 norm at most ``norm`` on the client; the server clips again.

    In simulation the client's and the server's side are the same object in one process: a
    record batch that reaches :meth:`decode` as the very arrays this object's :meth:`encode`
    produced (no stage replaced them: a codec's decoded rows are new arrays) has known norms
    within the bound, so the server's check reuses them instead of reading every record
    again. A record from anywhere else (another process, the network, a test) is always
    checked in full."""

    norm: float
    name: str = "clip"
    position: str = "clip"
    commutes_with_sum: bool = True  # the server-side check is per record, before any sum
    report_clipped: bool = True  # local DP sends nothing it does not noise: no clipped bit
    recheck: bool = True  # re-clip on the server; not after client-side noise (local DP)
    # Batches this object clipped in this process and has not checked yet (see above).
    _bounded: _ClippedHere = field(default_factory=_ClippedHere, compare=False, repr=False)

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
        bound = broadcast[f"{self.name}.norm"]
        norms = row_norms(batch)
        clipped_batch, clipped = clip_to_norms(batch, bound, norms)
        if self.recheck and bool(np.isfinite(norms).all()):  # (not NaN: then not within)
            self._remember(clipped_batch, bound)
        if not self.report_clipped:
            return clipped_batch
        return clipped_batch.with_scalars(**{f"{self.name}.clipped": clipped.astype(np.float64)})

    def _remember(self, batch: RecordBatch, bound: float) -> None:
        """Note ``batch`` as clipped to ``bound`` here (forgetting batches that are gone)."""
        for key in [k for k, b in self._bounded.items() if b.arrays[0]() is None]:
            del self._bounded[key]
        refs = tuple(weakref.ref(a) for a in batch.arrays.values())
        if refs:
            self._bounded[_identity(batch)] = _Bounded(refs, bound)

    def clipped_here(self, batch: RecordBatch, bound: float) -> bool:
        """Whether this object clipped ``batch`` (these very arrays) to at most ``bound`` in
        this process and no check has used that yet (each such batch is vouched for once)."""
        known = self._bounded.pop(_identity(batch), None)
        return known is not None and known.holds(batch) and known.bound <= bound

    def decode(self, batch: RecordBatch, state: StageState) -> RecordBatch:
        """The server re-applies the bound (a no-op for honest clients; a client that skipped
        clipping is clipped here) and trusts no clipped bit outside {0, 1}. With client-side
        noise after the clip (local DP) the record's norm is the noise's: nothing to check."""
        if not self.recheck:
            return batch
        if self.clipped_here(batch, state["norm"]):
            clipped_batch, clipped = batch, np.zeros(len(batch), bool)
        else:
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
