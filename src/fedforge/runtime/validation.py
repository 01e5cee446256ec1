"""Validation of every client result before it may touch the aggregate."""

from __future__ import annotations

import numpy as np

from fedforge.core.errors import InvalidUpdateError
from fedforge.core.params import ParamSpec
from fedforge.core.results import ClientResult


def validate_result(result: ClientResult, spec: ParamSpec, max_examples: int) -> None:
    """Raise :class:`InvalidUpdateError` unless ``result`` is safe to aggregate.

    Checks: exactly the expected names, each array's shape and dtype, finite values, an
    integer sample count in ``[1, max_examples]`` and a finite training loss.
    """
    update = result.update
    if not isinstance(update, dict):
        raise InvalidUpdateError(f"update must be a dict of arrays, got {type(update).__name__}")
    missing = spec.keys() - update.keys()
    extra = update.keys() - spec.keys()
    if missing or extra:
        raise InvalidUpdateError(
            f"update keys differ from the model: missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}"
        )
    for name, want in spec.items():
        arr = update[name]
        if not isinstance(arr, np.ndarray):
            raise InvalidUpdateError(f"{name}: expected a numpy array, got {type(arr).__name__}")
        if arr.shape != want.shape:
            raise InvalidUpdateError(f"{name}: shape {arr.shape}, expected {want.shape}")
        if arr.dtype != want.dtype:
            raise InvalidUpdateError(f"{name}: dtype {arr.dtype}, expected {want.dtype}")
        if not np.isfinite(arr).all():
            raise InvalidUpdateError(f"{name}: contains NaN or infinite values")
    n = result.num_examples
    if isinstance(n, bool) or not isinstance(n, int | np.integer):
        raise InvalidUpdateError(f"num_examples must be an integer, got {type(n).__name__}")
    if not 1 <= n <= max_examples:
        raise InvalidUpdateError(f"num_examples {n} outside the allowed range [1, {max_examples}]")
    if not np.isfinite(result.train_loss):
        raise InvalidUpdateError(f"train_loss {result.train_loss} is not finite")
