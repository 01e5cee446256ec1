"""Update compression as a stage: the client encodes its record with a codec
(``compress/codecs.py``), the encoded arrays are what travels and what the round's
``bytes_up`` counts, and the server decodes before aggregation.

All of a record's arrays are flattened (in name order, as float32) into one row, so one codec
scale or rotation covers the whole update. Decoding does not commute with summation (each
record has its own scales), so a codec cannot precede secure aggregation; after clipping, the
server's clip check runs on the decoded record (decode runs in reverse chain order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fedforge.compress.codecs import error_feedback_
from fedforge.core.params import ArraySpec, Params
from fedforge.core.records import RecordBatch, RecordSpec
from fedforge.stages.base import StageDefaults, StageState

PREFIX = "codec/"
RESIDUAL = "residual"  # error feedback's client state: what the codec has not sent yet


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

    def encode(
        self, batch: RecordBatch, broadcast: Mapping[str, float], seeds: Sequence[int]
    ) -> RecordBatch:
        payload = self.codec.encode(self._rows(batch), list(seeds))
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

    def bytes_per_record(self) -> int:
        """Encoded bytes of one record (the codec's formula)."""
        return int(self.codec.encoded_bytes(self.width()))
