"""The five LoRA aggregation modes at model level: what travels, and the server's aggregate.

Each mode is described by :class:`ModeTraits` (which factors a client sends, which it keeps,
whether the server's aggregate is a weighted mean of the records) and applied to whole
``Params`` (every adapted matrix of an :class:`~fedforge.llm.layout.AdapterLayout`) by
:func:`aggregate`, on top of the per-matrix math of :mod:`fedforge.llm.aggregation`.

How the modes map onto fedforge's round protocol:

- ``fedit``, ``ffa``, ``fedsa``: the new global arrays are the weighted mean of the records'
  arrays, so the records are ordinary deltas summed by the ``mean`` kind; secure aggregation
  (``secure_sum``), central DP (noise on the mean) and robust means (``gather`` with a rule) all
  apply unchanged. ``fedsa``'s ``B`` is client state, like FedPer's head.
- ``exact``, ``hetero``: the aggregate is bilinear in each record (``B_k A_k``), not a sum of
  the records' arrays: the server must hold every record (``gather``) and post-process (SVD).
  Secure aggregation cannot compute it, and a robust rule on factor rows would not be exact;
  both are refused. Their residual changes the frozen base, which clients must then receive.

The head (``head/...``) is averaged in every mode: a linear head's mean is FedAvg's.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fedforge.core.params import Params
from fedforge.llm.aggregation import (
    Factors,
    LowRank,
    exact,
    fedit,
    fedsa,
    ffa,
    hetero,
    weighted_mean,
)
from fedforge.llm.layout import AdapterLayout

Mode = Literal["fedit", "ffa", "exact", "hetero", "fedsa"]
MODES: tuple[Mode, ...] = ("fedit", "ffa", "exact", "hetero", "fedsa")


@dataclass(frozen=True)
class ModeTraits:
    """What a mode sends up and keeps, and what its server aggregate needs.

    ``summable``: the aggregate is the weighted mean of the records' arrays (mean, secure sum
    and robust kinds apply); otherwise the server needs all records (``gather``) and an SVD.
    ``trains_a``: whether ``A`` moves in local training (FFA-LoRA freezes it).
    ``personal_b``: each client keeps its ``B`` in its own state. ``folds_base``: the server
    folds a residual into the frozen base. ``mixed_ranks``: clients may differ in rank."""

    sends_a: bool
    sends_b: bool
    trains_a: bool
    personal_b: bool
    summable: bool
    folds_base: bool
    mixed_ranks: bool


TRAITS: dict[Mode, ModeTraits] = {
    "fedit": ModeTraits(True, True, True, False, True, False, False),
    "ffa": ModeTraits(False, True, False, False, True, False, False),
    "exact": ModeTraits(True, True, True, False, False, True, False),
    "hetero": ModeTraits(True, True, True, False, False, False, True),
    "fedsa": ModeTraits(True, False, True, True, True, False, False),
}


def traits(mode: str) -> ModeTraits:
    if mode not in TRAITS:
        raise ValueError(f"unknown LoRA aggregation {mode!r}: choose one of {', '.join(MODES)}")
    return TRAITS[mode]


def exchanged_names(mode: str, layout: AdapterLayout) -> list[str]:
    """The arrays that travel each round, up and down: the shared factors and the head.
    (``ffa``'s ``A`` is derived from the shared seed; ``fedsa``'s ``B`` never leaves.)"""
    t = traits(mode)
    names = [m.a_name for m in layout.matrices] if t.sends_a else []
    if t.sends_b:
        names += [m.b_name for m in layout.matrices]
    return names + list(layout.head_names)


def client_record(mode: str, trained: Mapping[str, np.ndarray], layout: AdapterLayout) -> Params:
    """The arrays a client sends, taken from its trained (or delta) arrays."""
    return {n: np.asarray(trained[n]) for n in exchanged_names(mode, layout)}


def uplink_bytes(mode: str, layout: AdapterLayout, dtype: np.dtype | type = np.float32) -> int:
    """Bytes one client sends per round, by formula at ``dtype``: per adapted matrix
    ``r (d_in + d_out)`` (fedit, exact, hetero at the client's rank), ``r d_out`` (ffa),
    ``r d_in`` (fedsa); plus the head's arrays."""
    t = traits(mode)
    per_matrix = sum(
        m.rank * ((m.d_in if t.sends_a else 0) + (m.d_out if t.sends_b else 0))
        for m in layout.matrices
    )
    head = sum(int(np.prod(shape)) for _, shape in layout.head)
    return (per_matrix + head) * np.dtype(dtype).itemsize


def residual_bytes(residual: Mapping[str, LowRank], dtype: np.dtype | type = np.float32) -> int:
    """Bytes to ship a folded residual to clients: each module's residual as factors or dense,
    whichever is smaller."""
    total = 0
    for low in residual.values():
        d_out, d_in = low.left.shape[0], low.right.shape[1]
        total += min(low.rank * (d_in + d_out), d_in * d_out)
    return total * np.dtype(dtype).itemsize


@dataclass(frozen=True)
class LoraAggregate:
    """The server's result of one round.

    ``params``: the new global arrays the mode aggregates (its exchanged names, at the largest
    rank for ``hetero``); ``by_rank``: ``hetero``'s arrays per client rank; ``residual``: per
    module, the part of the mean update the factors cannot hold (``exact`` folds it into the
    base); ``residual_norm``: its Frobenius norm over all modules; ``tail_norms``: per rank,
    the norm ``hetero``'s projection to that rank drops."""

    params: Params
    by_rank: dict[int, Params]
    residual: dict[str, LowRank]
    residual_norm: float
    tail_norms: dict[int, float]


def _factors(params: Mapping[str, np.ndarray], layout: AdapterLayout, module: int) -> Factors:
    m = layout.matrices[module]
    return Factors(np.asarray(params[m.a_name]), np.asarray(params[m.b_name]), m.scale)


def _head_mean(
    records: Sequence[Mapping[str, np.ndarray]], weights: np.ndarray, layout: AdapterLayout
) -> Params:
    return {n: weighted_mean([r[n] for r in records], weights) for n in layout.head_names}


def aggregate(
    mode: str,
    records: Sequence[Mapping[str, np.ndarray]],
    weights: Sequence[float] | np.ndarray,
    layouts: Sequence[AdapterLayout],
    target: AdapterLayout,
    frozen_a: Mapping[str, np.ndarray] | None = None,
) -> LoraAggregate:
    """One round's aggregate from the clients' trained arrays (absolute values, not deltas).

    ``layouts[k]`` is client ``k``'s layout (its rank); ``target`` the global layout (for
    ``hetero``, at the largest rank; the ranks to project to are the clients' ranks).
    ``frozen_a`` is ``ffa``'s shared ``A``. Arrays come back in float64."""
    t = traits(mode)
    w = np.asarray(weights, np.float64)
    if len(records) != len(layouts):
        raise ValueError(f"{len(records)} records but {len(layouts)} client layouts")
    if not t.mixed_ranks and any(lay != target for lay in layouts):
        raise ValueError(
            f"{mode} needs every client at the global rank: use hetero for mixed ranks"
        )
    head = _head_mean(records, w, target)
    out: Params = dict(head)
    by_rank: dict[int, Params] = {}
    residual: dict[str, LowRank] = {}
    tails: dict[int, float] = {}
    squared = 0.0  # the residual's squared Frobenius norm, summed over modules
    for i, m in enumerate(target.matrices):
        both = t.sends_a and t.sends_b  # records hold both factors
        clients = (
            [_factors(r, lay, i) for r, lay in zip(records, layouts, strict=True)] if both else []
        )
        if mode == "fedit":
            f = fedit(clients, w)
            out[m.a_name], out[m.b_name] = f.a, f.b
        elif mode == "ffa":
            if frozen_a is None:
                raise ValueError("ffa needs the shared frozen A")
            f = ffa([r[m.b_name] for r in records], frozen_a[m.a_name], m.scale, w)
            out[m.b_name] = f.b
        elif mode == "fedsa":
            out[m.a_name] = fedsa([r[m.a_name] for r in records], w)
        elif mode == "exact":
            result = exact(clients, w, m.rank, m.scale)
            out[m.a_name], out[m.b_name] = result.factors.a, result.factors.b
            residual[m.module] = result.residual
            squared += result.residual_norm**2
        else:  # hetero
            scales = {lay.matrices[i].rank: lay.matrices[i].scale for lay in layouts}
            scales[m.rank] = m.scale
            h = hetero(clients, w, scales)
            for rank, f in h.factors.items():
                by_rank.setdefault(rank, {})[m.a_name] = f.a
                by_rank[rank][m.b_name] = f.b
                tails[rank] = float(np.hypot(tails.get(rank, 0.0), h.tail_norms[rank]))
            out[m.a_name], out[m.b_name] = h.factors[m.rank].a, h.factors[m.rank].b
            residual[m.module] = h.residual
            squared += h.tail_norms[m.rank] ** 2
    for arrays in by_rank.values():
        arrays.update(head)
    return LoraAggregate(out, by_rank, residual, float(np.sqrt(squared)), tails)


def slice_rank(
    top: Mapping[str, np.ndarray], top_layout: AdapterLayout, layout: AdapterLayout
) -> Params:
    """A ``hetero`` client's factors from the one broadcast at the largest rank.

    The projections are nested truncations of one SVD with singular values split evenly, so
    rank ``r``'s factors are the leading ``r`` components of the top rank's, rescaled by
    ``sqrt(s_top / s_r)`` for the client's own scale: every client gets the same broadcast."""
    out: Params = {n: np.asarray(top[n]) for n in layout.head_names}
    for big, own in zip(top_layout.matrices, layout.matrices, strict=True):
        if own.rank > big.rank or own.module != big.module:
            raise ValueError(f"cannot slice {big.module} rank {big.rank} to {own}")
        factor = np.sqrt(big.scale / own.scale)
        out[own.a_name] = factor * np.asarray(top[big.a_name])[: own.rank]
        out[own.b_name] = factor * np.asarray(top[big.b_name])[:, : own.rank]
    return out
