"""Parameters in shared memory: a fixed byte layout over an anonymous shared mapping.

Worker processes forked after the mapping is created see the same memory, so parameters and
updates move between processes as raw bytes, never pickled.
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import numpy as np

from fedforge.core.errors import InvalidUpdateError
from fedforge.core.params import Params


@dataclass(frozen=True)
class Slot:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int


class ParamLayout:
    """Where each named array lives inside a flat byte buffer."""

    def __init__(self, params: Params) -> None:
        slots, offset = [], 0
        for name, arr in params.items():
            offset = -(-offset // 8) * 8  # 8-byte alignment
            slots.append(Slot(name, arr.dtype, tuple(arr.shape), offset, int(arr.nbytes)))
            offset += int(arr.nbytes)
        self.slots = slots
        self.nbytes = max(offset, 1)

    def allocate(self) -> mmap.mmap:
        """A new anonymous shared mapping large enough for one set of parameters."""
        return mmap.mmap(-1, self.nbytes)

    def write(self, buffer: mmap.mmap, params: Params) -> None:
        """Copy ``params`` into ``buffer``; raise if names, shapes or dtypes differ."""
        if set(params) != {s.name for s in self.slots}:
            raise InvalidUpdateError(
                f"update names {sorted(params)} differ from the model's parameters"
            )
        for s in self.slots:
            arr = params[s.name]
            if not isinstance(arr, np.ndarray) or arr.shape != s.shape or arr.dtype != s.dtype:
                raise InvalidUpdateError(
                    f"{s.name}: expected {s.dtype}{list(s.shape)}, got "
                    f"{getattr(arr, 'dtype', type(arr).__name__)}{list(getattr(arr, 'shape', ()))}"
                )
            view = np.frombuffer(buffer, s.dtype, count=arr.size, offset=s.offset)
            view[:] = arr.reshape(-1)

    def read(self, buffer: mmap.mmap) -> Params:
        """A private copy of the parameters held in ``buffer``."""
        return {
            s.name: np.frombuffer(buffer, s.dtype, count=int(np.prod(s.shape)), offset=s.offset)
            .reshape(s.shape)
            .copy()
            for s in self.slots
        }
