"""Named parameter arrays: the framework-neutral currency of fedforge.

Parameters, client updates and aggregates are all ``Params``: an ordered mapping from a
parameter name to a NumPy array. Runtimes and algorithms exchange nothing else, which keeps
the core independent of PyTorch and makes every value serializable without pickle.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Params = dict[str, np.ndarray]


@dataclass(frozen=True)
class ArraySpec:
    """Shape and dtype one named array must have."""

    shape: tuple[int, ...]
    dtype: np.dtype


ParamSpec = dict[str, ArraySpec]


def spec_of(params: Mapping[str, np.ndarray]) -> ParamSpec:
    """The shape and dtype of every named array, in order."""
    return {name: ArraySpec(tuple(arr.shape), arr.dtype) for name, arr in params.items()}


def num_bytes(params: Mapping[str, np.ndarray]) -> int:
    """Payload size of the arrays in bytes (what a raw wire encoding carries)."""
    return sum(int(arr.nbytes) for arr in params.values())


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Params:
    """Elementwise ``a - b`` for every name of ``a``."""
    return {name: a[name] - b[name] for name in a}


def params_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> bool:
    """True when both hold the same names with bit-identical arrays."""
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a
    )
