"""Fixed-norm update clipping: each record's arrays scaled to L2 norm at most ``norm``.

The norm is over *all* arrays of the record together (everything the client releases), as
differential privacy needs. Each record carries the summed scalar ``clip.clipped`` (1 when it
was clipped), so the server learns how many clients were clipped, and nothing more.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from fedforge.aggregate.kinds import Aggregate
from fedforge.core.records import RecordBatch, RecordSpec
from fedforge.stages.base import StageState


def row_norms(batch: RecordBatch) -> np.ndarray:
    """L2 norm of each record over all its arrays, in float64."""
    squares = np.zeros(len(batch), np.float64)
    for arr in batch.arrays.values():
        flat = arr.reshape(len(batch), -1).astype(np.float64)
        squares += np.einsum("ij,ij->i", flat, flat)
    result: np.ndarray = np.sqrt(squares)
    return result


def clip_rows(batch: RecordBatch, norm: float) -> tuple[RecordBatch, np.ndarray]:
    """Scale every record to L2 norm <= ``norm``; return the batch and the clipped mask."""
    norms = row_norms(batch)
    clipped = norms > norm
    factor = np.where(clipped, norm / np.maximum(norms, 1e-300), 1.0)
    arrays = {}
    for name, arr in batch.arrays.items():
        shape = (len(batch),) + (1,) * (arr.ndim - 1)
        arrays[name] = (arr * factor.reshape(shape)).astype(arr.dtype)
    return batch.replace_arrays(arrays), clipped


@dataclass(frozen=True)
class FixedClip:
    norm: float
    name: str = "clip"
    position: str = "clip"
    commutes_with_sum: bool = True  # the server-side check is per record, before any sum

    def __post_init__(self) -> None:
        if not self.norm > 0:
            raise ValueError(f"clip norm must be > 0, got {self.norm}")

    def init_state(self) -> StageState:
        return {"norm": self.norm}

    def broadcast(self, state: StageState) -> dict[str, float]:
        return {f"{self.name}.norm": state["norm"]}

    def summed_scalars(self) -> tuple[str, ...]:
        return (f"{self.name}.clipped",)

    def wire_spec(self, spec: RecordSpec) -> RecordSpec:
        return spec

    def encode(self, batch: RecordBatch, broadcast: Mapping[str, float]) -> RecordBatch:
        clipped_batch, clipped = clip_rows(batch, broadcast[f"{self.name}.norm"])
        return clipped_batch.with_scalars(**{f"{self.name}.clipped": clipped.astype(np.float64)})

    def decode(self, batch: RecordBatch, state: StageState) -> RecordBatch:
        """The server re-applies the bound (a no-op for honest clients; a client that skipped
        clipping is clipped here) and trusts no clipped bit outside {0, 1}."""
        clipped_batch, clipped = clip_rows(batch, state["norm"])
        key = f"{self.name}.clipped"
        reported = batch.scalars[key]
        bit = np.where(clipped, 1.0, np.clip(np.round(reported), 0.0, 1.0))
        return clipped_batch.with_scalars(**{key: bit})

    def finish_round(
        self, state: StageState, aggregate: Aggregate
    ) -> tuple[StageState, dict[str, float]]:
        clipped = aggregate.scalars.get(f"{self.name}.clipped", 0.0)
        return state, {f"{self.name}.clipped": clipped, f"{self.name}.norm": state["norm"]}
