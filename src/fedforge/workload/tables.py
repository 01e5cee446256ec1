"""CSV and Parquet sites: a label column and feature columns, encoded on the site.

Numeric columns are standardized with the site's own mean and standard deviation (learned on
the site, never shared; ``scale = "none"`` leaves them); text columns listed as categorical
are one-hot encoded into a fixed number of buckets by a stable hash of the value, so every
site produces the same feature layout without sharing a vocabulary. Labels are integers
``0..classes-1``, or text looked up in the configured label list. Every problem is one
:class:`~fedforge.core.errors.DataError` line naming the file, the column and the row.
"""

from __future__ import annotations

import csv
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedforge.core.errors import DataError
from fedforge.data.datasets import ArrayDataset

Columns = dict[str, np.ndarray]  # name -> values (float64, or object for text)
MISSING = ("", "na", "nan", "null", "none")


def read_csv_columns(path: Path) -> Columns:
    """Every column of a CSV file with a header row, as text (object arrays)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not a UTF-8 text file ({exc.reason})") from None
    except csv.Error as exc:
        raise DataError(f"{path}: not a valid CSV file ({exc})") from None
    if not rows:
        raise DataError(f"{path}: empty file (expected a header row)")
    header = [h.strip() for h in rows[0]]
    if len(set(header)) != len(header):
        raise DataError(f"{path}: the header repeats a column name")
    body = [r for r in rows[1:] if any(cell.strip() for cell in r)]
    for number, row in enumerate(body, start=1):
        if len(row) != len(header):
            raise DataError(
                f"{path}: row {number} has {len(row)} fields, the header has {len(header)}"
            )
    table = np.array(body, dtype=object).reshape(len(body), len(header))
    return {name: table[:, i] for i, name in enumerate(header)}


def read_parquet_columns(path: Path) -> Columns:
    """Every column of a Parquet file: numbers as float64 (nulls as NaN), text as objects."""
    try:
        import pyarrow.parquet as pq
        import pyarrow.types as pt
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow: pip install 'fedforge[parquet]'"
        ) from None
    try:
        table = pq.read_table(path)
    except Exception as exc:  # pyarrow raises its own ArrowInvalid, OSError...
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    out: Columns = {}
    for name, column in zip(table.column_names, table.columns, strict=True):
        if pt.is_integer(column.type) or pt.is_floating(column.type) or pt.is_boolean(column.type):
            values = column.to_pylist()
            out[name] = np.array([np.nan if v is None else float(v) for v in values])
        else:
            out[name] = np.array(["" if v is None else str(v) for v in column.to_pylist()], object)
    return out


def encode_table(
    columns: Columns,
    path: Path,
    *,
    label: str,
    labels: Sequence[str] = (),
    features: Sequence[str] = (),
    categorical: Sequence[str] = (),
    buckets: int = 16,
    scale: str = "site",
) -> ArrayDataset:
    """Features (float32, one row per example) and labels (int64) from ``columns``."""
    if label not in columns:
        shown = ", ".join(list(columns)[:12])
        raise DataError(f"{path}: no label column {label!r} (columns: {shown})")
    names = list(features) or [c for c in columns if c != label]
    for name in [*names, *categorical]:
        if name not in columns:
            raise DataError(
                f"{path}: no column {name!r}, which data.features or data.categorical names"
            )
    if label in names:
        raise DataError(f"{path}: the label column {label!r} cannot also be a feature")
    if not names:
        raise DataError(f"{path}: no feature columns beside the label {label!r}")
    y = encode_labels(columns[label], path, label, labels)
    blocks = []
    for name in names:
        if name in categorical:
            blocks.append(hashed_one_hot(columns[name], buckets))
        else:
            values = numeric(columns[name], path, name)
            if scale == "site":
                std = values.std()
                values = (values - values.mean()) / (std if std > 0 else 1.0)
            elif scale == "log":
                values = np.sign(values) * np.log1p(np.abs(values))
            blocks.append(values[:, None])
    x = np.concatenate(blocks, axis=1).astype(np.float32)
    return ArrayDataset(x, y)


def numeric(values: np.ndarray, path: Path, name: str) -> np.ndarray:
    """A column as finite float64 numbers, or the DataError naming the first bad row."""
    if values.dtype != object:
        out = values.astype(np.float64)
    else:
        out = np.empty(len(values))
        for row, value in enumerate(values):
            text = str(value).strip()
            if text.lower() in MISSING:
                out[row] = np.nan
                continue
            try:
                out[row] = float(text)
            except ValueError:
                raise DataError(
                    f"{path}: column {name!r} holds text ({text[:40]!r} in row {row + 1}); "
                    "list it in data.categorical to one-hot encode it"
                ) from None
    bad = np.flatnonzero(~np.isfinite(out))
    if len(bad):
        raise DataError(
            f"{path}: column {name!r} has a missing, NaN or infinite value in row {bad[0] + 1}"
        )
    return out


def hashed_one_hot(values: np.ndarray, buckets: int) -> np.ndarray:
    """One-hot rows over ``buckets`` by the CRC-32 of each value's text (stable everywhere)."""
    codes = np.array([zlib.crc32(str(v).strip().encode()) % buckets for v in values], np.int64)
    out = np.zeros((len(values), buckets))
    out[np.arange(len(values)), codes] = 1.0
    return out


def encode_labels(values: np.ndarray, path: Path, column: str, labels: Sequence[str]) -> np.ndarray:
    """Class indices: the position in ``labels`` of each value's text, or the integer value
    itself when no label list is given."""
    out = np.empty(len(values), np.int64)
    index = {text: i for i, text in enumerate(labels)}
    for row, value in enumerate(values):
        text = _label_text(value)
        if text.lower() in MISSING:
            raise DataError(f"{path}: the label {column!r} is missing in row {row + 1}")
        if labels:
            if text not in index:
                raise DataError(
                    f"{path}: label {text[:40]!r} in row {row + 1} is not one of the labels "
                    f"{list(labels)}"
                )
            out[row] = index[text]
            continue
        try:
            number = float(text)
        except ValueError:
            raise DataError(
                f"{path}: label {text[:40]!r} in row {row + 1} is not an integer class; list "
                "the label values in data.labels"
            ) from None
        if number != int(number) or number < 0:
            raise DataError(
                f"{path}: label {text!r} in row {row + 1} is not a class (an integer >= 0)"
            )
        out[row] = int(number)
    return out


def _label_text(value: object) -> str:
    """A label's text; a float that is an integer (a Parquet label column of floats) as one."""
    if isinstance(value, float) and np.isfinite(value) and value == int(value):
        return str(int(value))
    return str(value).strip()
