"""What a secure-aggregation session works on and gives back: how a record flattens into the
masked vector, what the server received, and the recovered sum."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from fedforge.core.params import Params
from fedforge.core.records import RecordSpec


@dataclass(frozen=True)
class Layout:
    """How a record flattens into the masked vector: arrays then summed scalars (each in
    name order), then the secure-aggregation clipped bit."""

    arrays: tuple[tuple[str, tuple[int, ...], np.dtype], ...]
    scalars: tuple[str, ...]

    @classmethod
    def of(cls, spec: RecordSpec) -> Layout:
        arrays = tuple((n, a.shape, np.dtype(a.dtype)) for n, a in sorted(spec.arrays.items()))
        return cls(arrays, tuple(sorted(spec.scalars)))

    @property
    def array_size(self) -> int:
        return sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _ in self.arrays)

    def unflatten(self, values: np.ndarray) -> tuple[Params, dict[str, float], float]:
        arrays, start = {}, 0
        for name, shape, _ in self.arrays:
            size = int(np.prod(shape, dtype=np.int64))
            arrays[name] = values[start : start + size].reshape(shape)
            start += size
        scalars = {n: float(values[start + i]) for i, n in enumerate(self.scalars)}
        return arrays, scalars, float(values[-1])


@dataclass
class Transcript:
    """What the server received, per step; ``shares[kind]`` names the clients whose share
    of that kind (``seed`` or ``key``) reached the server."""

    replied: dict[str, list[int]] = field(default_factory=dict)
    shares: dict[str, set[int]] = field(default_factory=lambda: {"seed": set(), "key": set()})

    def both_kinds(self) -> set[int]:
        """Clients of which the server holds both kinds of share (always empty)."""
        return self.shares["seed"] & self.shares["key"]


@dataclass(frozen=True)
class SecureSum:
    """The result: the exact sum of the survivors' weighted records (dequantized, float64;
    ``dtypes`` are the records' own)."""

    arrays: Params
    dtypes: dict[str, np.dtype]
    scalars: dict[str, float]
    clipped: float
    survivors: list[int]
    rho: float = 0.0  # distributed DP: this release's zCDP parameter (0 without noise)
    tau: float = 0.0  # ... and its slack on delta
