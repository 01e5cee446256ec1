"""Update compression as a stage: the client encodes its record with a codec
(``compress/codecs.py``), the encoded arrays are what travels and what the round's
``bytes_up`` counts, and the server decodes before aggregation.

All of a record's arrays are flattened (in name order, as float32) into one row, so one codec
scale or rotation covers the whole update. Decoding does not commute with summation (each
record has its own scales), so a codec cannot precede secure aggregation; after clipping, the
server's clip check runs on the decoded record (decode runs in reverse chain order).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedforge.aggregate.kinds import Summed
from fedforge.compress.codecs import error_feedback_
from fedforge.core.params import ArraySpec, Params
from fedforge.core.records import RecordBatch, RecordSpec
from fedforge.stages.base import StageDefaults, StageState

PREFIX = "codec/"
RESIDUAL = "residual"  # error feedback's client state: what the codec has not sent yet


class _RowsBuffer(threading.local):
    """A thread's reusable ``(n, d)`` float32 buffer for the flattened records it encodes
    (a fresh one page-faults on every write). A copy starts empty."""

    rows: np.ndarray | None = None

    def __reduce__(self) -> tuple[type[_RowsBuffer], tuple[()]]:
        return (_RowsBuffer, ())

    def take(self, n: int, d: int) -> np.ndarray:
        if self.rows is None or self.rows.shape[0] < n or self.rows.shape[1] != d:
            self.rows = np.empty((n, d), np.float32)
        return self.rows[:n]


@dataclass(frozen=True)
class Compress(StageDefaults):
    """Encode each record with ``codec`` on the client, decode it on the server."""

    codec: Any  # a ``compress.codecs`` codec: encode, decode, from_arrays, encoded_bytes
    error_feedback: bool = False  # keep what the codec lost in client state, send it later
    name: str = "compress"
    position: str = "compress"
    commutes_with_sum: bool = False
    # The record layout (name -> shape, dtype), learnt from the wire spec on the server.
    _layout: dict[str, ArraySpec] = field(default_factory=dict, compare=False, repr=False)
    _buffer: _RowsBuffer = field(default_factory=_RowsBuffer, compare=False, repr=False)

    def wire_spec(self, spec: RecordSpec) -> RecordSpec:
        self._layout.clear()
        self._layout.update(sorted(spec.arrays.items()))
        d = self.width()
        sample = self.codec.encode(np.zeros((1, d), np.float32), [0]).arrays()
        arrays = {
            PREFIX + key: ArraySpec(tuple(value.shape[1:]), value.dtype)
            for key, value in sample.items()
        }
        return RecordSpec(arrays, spec.scalars, spec.metrics)

    def width(self) -> int:
        return sum(int(np.prod(s.shape, dtype=np.int64)) for s in self._layout.values())

    @property
    def keeps_client_state(self) -> bool:  # type: ignore[override]
        return self.error_feedback

    @staticmethod
    def _rows(batch: RecordBatch) -> np.ndarray:
        names = sorted(batch.arrays)
        parts = [batch.arrays[k].reshape(len(batch), -1) for k in names]
        if len(parts) == 1:
            return parts[0].astype(np.float32)  # (a copy: error feedback overwrites it)
        return np.concatenate(parts, axis=1, dtype=np.float32)

    def _rows_view(self, batch: RecordBatch) -> np.ndarray:
        """The flattened records for reading only: in this thread's reusable buffer."""
        names = sorted(batch.arrays)
        parts = [batch.arrays[k].reshape(len(batch), -1) for k in names]
        if len(parts) == 1 and parts[0].dtype == np.float32:
            return parts[0]
        out = self._buffer.take(len(batch), sum(p.shape[1] for p in parts))
        return np.concatenate(parts, axis=1, out=out, casting="same_kind")

    def encode(
        self, batch: RecordBatch, broadcast: Mapping[str, float], seeds: Sequence[int]
    ) -> RecordBatch:
        payload = self.codec.encode(self._rows_view(batch), list(seeds))
        return batch.replace_arrays({PREFIX + k: v for k, v in payload.arrays().items()})

    def encode_with_state(
        self,
        batch: RecordBatch,
        broadcast: Mapping[str, float],
        seeds: Sequence[int],
        states: Sequence[Params],
    ) -> tuple[RecordBatch, list[Params]]:
        """Error feedback: each row's residual (what the codec lost before) is added before
        encoding, and what it loses now is the new residual."""
        rows = self._rows(batch)  # (a fresh array: corrected and overwritten in place)
        for row, state in enumerate(states):
            kept = state.get(RESIDUAL)
            if kept is not None and kept.shape == rows.shape[1:]:  # (a changed model: reset)
                rows[row] += kept
        payload, new = error_feedback_(self.codec, rows, list(seeds))
        encoded = batch.replace_arrays({PREFIX + k: v for k, v in payload.arrays().items()})
        return encoded, [{RESIDUAL: new[row]} for row in range(len(batch))]

    def decode(self, batch: RecordBatch, state: StageState) -> RecordBatch:
        payload = self.codec.from_arrays(
            {k.removeprefix(PREFIX): v for k, v in batch.arrays.items()}
        )
        rows = self.codec.decode(payload, self.width())
        arrays, start = {}, 0
        for name, spec in self._layout.items():
            size = int(np.prod(spec.shape, dtype=np.int64))
            block = rows[:, start : start + size].reshape((len(batch), *spec.shape))
            arrays[name] = block.astype(spec.dtype, copy=False)  # (views when float32)
            start += size
        return batch.replace_arrays(arrays)

    def weighted_sum(self, batch: RecordBatch, weights: np.ndarray) -> Summed | None:
        """``weights @ rows`` of the decoded records, for a weighted mean that needs no
        decoded record; None when the codec cannot sum its payloads without decoding them
        (then :meth:`decode` them)."""
        summer = getattr(self.codec, "weighted_sum", None)
        if summer is None:
            return None
        payload = self.codec.from_arrays(
            {k.removeprefix(PREFIX): v for k, v in batch.arrays.items()}
        )
        total = summer(payload, self.width(), weights)
        if total is None:
            return None
        sums, start = {}, 0
        for name, spec in self._layout.items():
            size = int(np.prod(spec.shape, dtype=np.int64))
            sums[name] = total[start : start + size].view(spec.shape)
            start += size
        return Summed(sums, {name: np.dtype(spec.dtype) for name, spec in self._layout.items()})

    def bytes_per_record(self) -> int:
        """Encoded bytes of one record (the codec's formula)."""
        return int(self.codec.encoded_bytes(self.width()))
