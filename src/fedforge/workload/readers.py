"""The built-in readers of a site's data: CSV, Parquet, ``.npz`` and image folders.

:func:`read_data` picks the reader by the path (a directory is an image folder; otherwise
the suffix, or ``format``) and returns an :class:`~fedforge.ArrayDataset`. A problem with the
data stops the site with one :class:`~fedforge.core.errors.DataError` line naming the file.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedforge.core.errors import DataError
from fedforge.data.datasets import ArrayDataset
from fedforge.workload.images import read_image_folder
from fedforge.workload.tables import encode_table, read_csv_columns, read_parquet_columns

FORMATS = {".csv": "csv", ".tsv": "csv", ".parquet": "parquet", ".pq": "parquet", ".npz": "npz"}


@dataclass(frozen=True)
class ReadSpec:
    """How to read a site's file (the ``[data]`` reading keys)."""

    format: str = "auto"
    label: str = "label"
    labels: tuple[str, ...] = ()
    features: tuple[str, ...] = ()
    categorical: tuple[str, ...] = ()
    category_buckets: int = 16
    scale: str = "site"
    image_size: tuple[int, ...] = (28, 28)
    channels: int = 1


def read_data(
    path: str | Path,
    *,
    format: str = "auto",
    label: str = "label",
    labels: Sequence[str] = (),
    features: Sequence[str] = (),
    categorical: Sequence[str] = (),
    category_buckets: int = 16,
    scale: str = "site",
    image_size: Sequence[int] = (28, 28),
    channels: int = 1,
) -> ArrayDataset:
    """One site's data from ``path`` with the built-in readers (see ``[data]`` in the
    configuration reference for each keyword): what ``data.sites`` and ``fedforge client
    --data`` read, and what a data function may call."""
    spec = ReadSpec(
        format,
        label,
        tuple(labels),
        tuple(features),
        tuple(categorical),
        category_buckets,
        scale,
        tuple(image_size),
        channels,
    )
    return read_with(Path(path), spec)


def read_with(path: Path, spec: ReadSpec) -> ArrayDataset:
    """:func:`read_data` with the settings in ``spec``."""
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    kind = spec.format
    if kind == "auto":
        kind = "images" if path.is_dir() else FORMATS.get(path.suffix.lower(), "")
    if not kind:
        raise DataError(
            f"{path}: unknown data format {path.suffix!r}; use .csv, .parquet, .npz or an "
            "image folder, or set data.format"
        )
    if kind == "images":
        if not path.is_dir():
            raise DataError(f"{path}: an image folder must be a directory of class folders")
        return read_image_folder(path, spec.labels, spec.image_size, spec.channels)
    if path.is_dir():
        raise DataError(f"{path}: a directory, but data.format is {kind!r}")
    if kind == "npz":
        return read_npz(path)
    columns = read_csv_columns(path) if kind == "csv" else read_parquet_columns(path)
    return encode_table(
        columns,
        path,
        label=spec.label,
        labels=spec.labels,
        features=spec.features,
        categorical=spec.categorical,
        buckets=spec.category_buckets,
        scale=spec.scale,
    )


def read_npz(path: Path) -> ArrayDataset:
    """Arrays ``x`` (one row per example, any shape) and ``y`` (integer labels); no pickle."""
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in ("x", "y") if k not in f.files]
            if missing:
                raise DataError(f"{path}: no array {missing[0]!r} (arrays: {sorted(f.files)})")
            x, y = f["x"], f["y"]
    except DataError:
        raise
    except Exception as exc:  # a truncated file, an object array (pickle refused), ...
        raise DataError(f"{path}: not a readable .npz of arrays x and y ({exc})") from None
    return checked_arrays(x, y, str(path))


def checked_arrays(x: np.ndarray, y: np.ndarray, where: str) -> ArrayDataset:
    """``x`` (float32 features or integer tokens) and ``y`` (int64) after the checks every
    site's data passes: one label per example, integer labels, finite features."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or len(x) == 0:
        raise DataError(f"{where}: no examples")
    if y.ndim != 1 or len(y) != len(x):
        raise DataError(
            f"{where}: {len(x)} examples but labels of shape {tuple(y.shape)} (one per example)"
        )
    integral = y.dtype.kind == "f" and np.all(np.isfinite(y)) and np.all(y == np.round(y))
    if y.dtype.kind not in "iu" and not integral:
        raise DataError(f"{where}: labels must be integers, got {y.dtype}")
    if x.dtype.kind == "f":
        bad = np.flatnonzero(~np.isfinite(x.reshape(len(x), -1)).all(axis=1))
        if len(bad):
            raise DataError(f"{where}: example {bad[0] + 1} has a NaN or infinite feature")
        x = x.astype(np.float32, copy=False)
    elif x.dtype.kind not in "iub":
        raise DataError(f"{where}: features must be numbers, got {x.dtype}")
    return ArrayDataset(np.ascontiguousarray(x), y.astype(np.int64))
