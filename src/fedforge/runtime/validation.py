"""Validation of every record before it may touch the aggregate.

Records are checked against the stage's wire spec (never against the model): exactly the
expected array names with their shapes and dtypes, the expected summed scalars and metrics,
finite values everywhere, and an integer example count in ``[1, cap]``. A batch is checked with
array operations: a structural mismatch rejects every row, a bad value only its row. Where the
records are summed as they arrive (a weighted mean, no stage decoding them), the finiteness
of the arrays is checked by the sum itself, in the same pass.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from fedforge.aggregate.kinds import rows_finite
from fedforge.core.params import ParamSpec
from fedforge.core.records import RecordBatch, RecordSpec


def layout_error(
    layout: Mapping[str, tuple[tuple[int, ...], np.dtype]], spec: ParamSpec
) -> str | None:
    """Why arrays of these (shape, dtype) by name are not exactly ``spec``'s (None: they
    are). Used on whole records and on a streamed payload's header before it is received."""
    missing, extra = spec.keys() - layout.keys(), layout.keys() - spec.keys()
    if missing or extra:
        return (
            f"array names differ from the spec: missing {sorted(missing)}, "
            f"unexpected {sorted(extra)}"
        )
    for name, want in spec.items():
        shape, dtype = layout[name]
        if tuple(shape) != tuple(want.shape):
            return f"{name}: shape {tuple(shape)}, expected {tuple(want.shape)}"
        if dtype != want.dtype:
            return f"{name}: dtype {dtype}, expected {want.dtype}"
    return None


def _structure_error(batch: RecordBatch, spec: RecordSpec) -> str | None:
    rows = len(batch)
    if not isinstance(batch.arrays, dict):
        return f"arrays must be a dict, got {type(batch.arrays).__name__}"
    for name, arr in batch.arrays.items():
        if not isinstance(arr, np.ndarray):
            return f"{name}: expected a numpy array, got {type(arr).__name__}"
        if arr.shape[:1] != (rows,):
            return f"{name}: {arr.shape[0] if arr.ndim else 0} rows, expected {rows}"
    error = layout_error({k: (v.shape[1:], v.dtype) for k, v in batch.arrays.items()}, spec.arrays)
    if error is not None:
        return error
    for field, names in (("scalars", spec.scalars), ("metrics", spec.metrics)):
        got = getattr(batch, field)
        if set(got) != set(names):
            return f"{field} {sorted(got)} differ from the expected {sorted(names)}"
        for key, values in got.items():
            if not isinstance(values, np.ndarray) or values.shape != (rows,):
                return f"{field} {key!r} must be one number per record"
    n = batch.num_examples
    if not isinstance(n, np.ndarray) or n.shape != (rows,) or n.dtype.kind not in "iu":
        return "num_examples must be an integer per record"
    return None


def validate_batch(
    batch: RecordBatch, spec: RecordSpec, caps: np.ndarray, arrays: bool = True
) -> tuple[np.ndarray, list[str | None]]:
    """(rows to keep, the reason each rejected row was rejected). ``arrays=False`` leaves out
    the check that every array value is finite, for a caller that checks it while summing
    (:meth:`~fedforge.aggregate.kinds.StreamingMean.add_finite`)."""
    rows = len(batch)
    error = _structure_error(batch, spec)
    if error is not None:
        return np.zeros(rows, bool), [error] * rows
    keep = np.ones(rows, bool)
    reasons: list[str | None] = [None] * rows

    def reject(mask: np.ndarray, why: str) -> None:
        for i in np.flatnonzero(mask & keep):
            reasons[i] = why
        keep[mask] = False

    for name, arr in batch.arrays.items() if arrays else ():
        reject(~rows_finite(arr.reshape(rows, -1)), f"{name}: NaN or infinite")
    for field in ("scalars", "metrics"):
        for key, values in getattr(batch, field).items():
            if values.dtype.kind not in "fiu":
                reject(np.ones(rows, bool), f"{key} is not a number")
            else:
                reject(~np.isfinite(values.astype(np.float64)), f"{key} is not finite")
    if not arrays and not keep.all():  # name the arrays of the rows refused for the above
        refused = np.flatnonzero(~keep)
        for name, arr in reversed(batch.arrays.items()):
            bad = refused[~rows_finite(arr[refused].reshape(len(refused), -1))]
            for i in bad:
                reasons[i] = f"{name}: NaN or infinite"
    n = batch.num_examples
    out_of_range = (n < 1) | (n > caps)
    for i in np.flatnonzero(out_of_range & keep):
        reasons[i] = f"num_examples {int(n[i])} outside the allowed range [1, {int(caps[i])}]"
    keep &= ~out_of_range
    return keep, reasons
