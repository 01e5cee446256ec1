"""Checks and conversions of user data at the API's edge (``ArrayDataset``,
``FederatedDataset``): what is unambiguous is converted (torch tensors and sequences to
NumPy, float64 features to float32, integer-valued float labels to int64), everything else
is refused with one :class:`DataError` that says what is wrong and where."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from fedforge.core.errors import DataError


def as_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a NumPy array: torch tensors (any device) and nested sequences too."""
    if type(value).__module__.split(".")[0] == "torch" and hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        array = np.asarray(value)
    except ValueError as exc:  # NumPy refuses ragged nested sequences
        raise DataError(f"{name} has rows of different lengths (ragged): {exc}") from None
    if array.dtype == object:
        raise DataError(
            f"{name} holds Python objects (rows of different lengths, or mixed types); "
            "it must be a numeric array"
        )
    return array


def as_features(value: Any) -> np.ndarray:
    """Features with one row per example and any feature shape (``(N, features)``, images
    ``(N, C, H, W)``, token ids ``(N, length)``). Floats become float32 and must be finite;
    integer features (token ids) are kept; booleans become float32."""
    x = as_array(value, "x")
    if x.ndim < 2:
        raise DataError(
            f"x must hold one row per example, shape (examples, features...); got shape "
            f"{x.shape} (a single feature: x.reshape(-1, 1))"
        )
    if x.dtype.kind == "b":
        return x.astype(np.float32)
    if x.dtype.kind in "iu":
        return x
    if x.dtype.kind != "f":
        raise DataError(
            f"x has dtype {x.dtype}; features must be real numbers (float32, or integers "
            "such as token ids)"
        )
    if x.dtype != np.float32:
        with np.errstate(over="ignore"):
            x = x.astype(np.float32)
    bad_rows = _non_finite_rows(x)
    if len(bad_rows):
        raise DataError(
            f"x has NaN or infinite values (as float32) in {len(bad_rows)} "
            f"row{'s' if len(bad_rows) > 1 else ''}, the first row {bad_rows[0]}; clean or "
            "drop them first"
        )
    return x


def _non_finite_rows(x: np.ndarray, block: int = 4096) -> np.ndarray:
    """Rows of ``x`` holding a NaN or an infinity, checked ``block`` rows at a time (a mask
    of a whole image dataset would cost a byte per value)."""
    width = int(np.prod(x.shape[1:]))
    bad = [np.zeros(0, np.int64)]
    for start in range(0, len(x), block):
        chunk = x[start : start + block]
        finite = np.isfinite(chunk).reshape(len(chunk), width).all(axis=1)
        bad.append(start + np.flatnonzero(~finite))
    return np.concatenate(bad)


def as_labels(value: Any) -> np.ndarray:
    """Class labels ``0 .. classes - 1`` as int64, one per example; integer-valued floats and
    booleans are converted, anything else is refused."""
    y = as_array(value, "y")
    if y.ndim != 1:
        raise DataError(
            f"y must hold one integer class label per example, shape (examples,); got shape "
            f"{y.shape}"
        )
    if y.dtype.kind == "f":
        bad = ~np.isfinite(y) | (y != np.round(y))
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"y must hold integer class labels, but y[{i}] = {y[i].item()!r}; labels are "
                "0, 1, ..., classes - 1 (regression targets are not supported)"
            )
    elif y.dtype.kind not in "biu":
        raise DataError(f"y has dtype {y.dtype}; labels must be integers 0, 1, ..., classes - 1")
    y = y.astype(np.int64)
    if len(y) and y.min() < 0:
        i = int(np.argmin(y))
        raise DataError(f"y holds a negative label (y[{i}] = {y[i].item()}); labels are 0, 1, ...")
    return y


def as_indices(value: Any, what: str, size: int) -> np.ndarray:
    """One client's example indices into a training set of ``size`` examples, as int64."""
    idx = as_array(value, what)
    if idx.ndim != 1:
        raise DataError(f"{what} must be a 1-D array of example indices; got shape {idx.shape}")
    if idx.dtype.kind == "b":
        raise DataError(f"{what} is a boolean mask; pass its indices (np.flatnonzero(mask))")
    if len(idx) and idx.dtype.kind not in "iu":
        raise DataError(f"{what} has dtype {idx.dtype}; example indices must be integers")
    idx = idx.astype(np.int64)
    if len(idx) and (idx.min() < 0 or idx.max() >= size):
        bad = idx[(idx < 0) | (idx >= size)][0]
        raise DataError(
            f"{what} has index {bad}, outside the training set (0 .. {size - 1}): "
            "indices are positions in train"
        )
    return idx


def check_disjoint(parts: Sequence[np.ndarray], size: int, what: str) -> None:
    """Every example belongs to at most one client of ``parts``, and at most once."""
    if not parts:
        return
    counts = np.bincount(np.concatenate(parts), minlength=size)
    if counts.max(initial=0) <= 1:
        return
    example = int(np.argmax(counts))
    owners = [cid for cid, idx in enumerate(parts) if np.any(idx == example)]
    where = (
        f"client {owners[0]} lists it {counts[example]} times"
        if len(owners) == 1
        else f"clients {', '.join(map(str, owners[:5]))} all hold it"
    )
    raise DataError(
        f"{what}: example {example} is given out more than once ({where}); each example "
        "must belong to one client only"
    )
