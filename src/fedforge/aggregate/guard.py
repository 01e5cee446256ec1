"""Refusing what no honest round produces, before it reaches the model.

- An update far larger than the round's others: a record whose L2 norm per local step
  exceeds ``ratio`` times the round's (low) median norm per step is an *offender*. The
  median of the round's own records moves with training (updates shrink as the model
  converges), and a minority of offenders cannot drag it: the low median of ``n`` values is
  one of the honest ones while fewer than half are offenders (empty updates, which move no
  model, are left out of it: a site replaying zeros cannot make every other site an
  outlier).
- An aggregate that is not finite (finite records can overflow a float32 or float64 sum) or
  larger than every accepted record allows, and a new model that is not finite.

The driver refuses such a round: the model is unchanged, and the round is tried again
without the offenders (:class:`Refusal`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np

from fedforge.core.params import Params
from fedforge.core.records import RecordBatch

DEPLOYMENT_RATIO = 10.0  # deployment's default outlier ratio (simulation: off by default)


@dataclass(frozen=True)
class Refusal:
    """Why a round's aggregate was refused, and the clients to leave out of its retry."""

    reason: str
    offenders: dict[int, str] = field(default_factory=dict)


NORM_BLOCK = 1 << 18  # columns per block: float64 temporaries stay a few MB per record


def _blocks(flat: list[np.ndarray]) -> Iterator[np.ndarray]:
    """Each ``(rows, d)`` array's columns in float64 blocks of at most NORM_BLOCK."""
    for f in flat:
        for start in range(0, f.shape[1], NORM_BLOCK):
            yield f[:, start : start + NORM_BLOCK].astype(np.float64)


def record_norms(batch: RecordBatch) -> np.ndarray:
    """Each record's L2 norm over all its arrays, in float64, without overflow (scaled by
    the record's largest magnitude), in blocks: a large model costs no float64 copy."""
    rows = len(batch)
    if not batch.arrays:
        return np.zeros(rows)
    flat = [np.asarray(a).reshape(rows, -1) for a in batch.arrays.values()]
    largest = np.zeros(rows)
    for block in _blocks(flat):
        if block.shape[1]:
            largest = np.maximum(largest, np.max(np.abs(block), axis=1))
    scale = np.where((largest > 0) & np.isfinite(largest), largest, 1.0)
    squares = np.zeros(rows)
    for block in _blocks(flat):
        block /= scale[:, None]
        squares += np.einsum("ij,ij->i", block, block)
    return np.asarray(scale * np.sqrt(squares), np.float64)


def low_median(values: list[float]) -> float:
    """The lower middle value: an honest one while fewer than half are offenders."""
    ordered = sorted(values)
    return ordered[(len(ordered) - 1) // 2]


@dataclass(frozen=True)
class OutlierBound:
    """Records whose norm per local step exceeds ``ratio`` times the round's low median norm
    per step are refused. Per step, because an honest site with ten times the data takes ten
    times the steps and sends a proportionally larger update; a client's steps come from its
    counted (capped) example count, so claiming more data buys no larger bound than the cap."""

    ratio: float

    def offenders(self, norms: Mapping[int, float], steps: Mapping[int, int]) -> dict[int, str]:
        """Client id -> why, for the records beyond the bound (``steps``: each client's local
        steps at its counted example count)."""
        if not norms:
            return {}
        rates = {c: n / max(steps[c], 1) for c, n in norms.items()}
        informative = [r for r in rates.values() if math.isfinite(r) and r > 0]
        if not informative:  # nothing but empty updates: nothing to compare with
            return {}
        median = low_median(informative)  # an empty update moves no model: not counted
        return {
            cid: (
                f"update norm {norms[cid]:.4g} over {steps[cid]} local steps > {self.ratio:g} "
                f"x the round's median norm per step {median:.4g}"
            )
            for cid, rate in sorted(rates.items())
            if not rate <= self.ratio * median
        }


def aggregate_problem(arrays: Params, bound: float | None = None) -> str | None:
    """Why an aggregate must not be applied: not finite, or (with ``bound``, the largest
    accepted record's norm) larger than any mean of the accepted records can be."""
    for name, values in arrays.items():
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"the aggregate's {name} is not finite (a sum overflowed)"
    if bound is not None:
        norm = float(record_norms(RecordBatch(np.zeros(1), np.ones(1), _rows(arrays)))[0])
        if norm > bound * (1 + 1e-6):
            return f"the aggregate's norm {norm:.4g} exceeds its records' bound {bound:.4g}"
    return None


def params_problem(params: Params) -> str | None:
    """Why a new model must not be applied (a parameter that is not finite)."""
    for name, values in params.items():
        if values.dtype.kind == "f" and not np.isfinite(values).all():
            return f"the new model's {name} is not finite"
    return None


def _rows(arrays: Params) -> dict[str, np.ndarray]:
    return {k: np.asarray(v)[None] for k, v in arrays.items() if np.asarray(v).dtype.kind == "f"}
