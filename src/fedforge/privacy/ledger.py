"""Central DP's ledger: every release a run has paid for, as segments of identical releases.

A run resumed with other settings (another noise multiplier, sampling rate, K, population)
releases a different mechanism from then on; its past releases stay accounted as they were
and epsilon is ``dp-accounting``'s composition of every segment, so a resumed run never
reports less than it had spent. Segments compose under one neighbouring relation only:
K of N is accounted under replace-one (the only without-replacement event in dp-accounting),
Poisson sampling and full participation under add-or-remove, and dp-accounting composes no
Poisson event under replace-one; a resume that would mix the two relations is refused.

The ledger lives in the noise stage's checkpointed state (``dict[str, float]``): one entry per
segment, its key the release's canonical description, its value the count.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

import numpy as np

from fedforge.core.errors import ConfigError
from fedforge.privacy.accounting import (
    AccountantKind,
    SamplingScheme,
    accountant_for,
    composed_pld,
    epsilon,
)

if TYPE_CHECKING:
    from dp_accounting import dp_event

PREFIX = "ledger:"


@dataclass(frozen=True)
class Release:
    """One release as accounted: the sampling scheme and the accounted noise multiplier (the
    noise stddev over the bound on one record's norm in the sum)."""

    scheme: SamplingScheme
    noise_multiplier: float

    def key(self) -> str:
        s = self.scheme
        fields = [s.kind, s.population, s.rate, s.sample_size, s.keep, self.noise_multiplier]
        return PREFIX + json.dumps(fields, separators=(",", ":"))

    @classmethod
    def from_key(cls, key: str) -> Release:
        kind, population, rate, sample_size, keep, z = json.loads(key[len(PREFIX) :])
        scheme = SamplingScheme(kind, int(population), float(rate), int(sample_size), int(keep))
        return cls(scheme, float(z))


Ledger = dict[Release, int]


def read(state: Mapping[str, float]) -> Ledger:
    """The segments recorded in a stage state."""
    return {Release.from_key(k): int(v) for k, v in state.items() if k.startswith(PREFIX)}


def entries(ledger: Ledger) -> dict[str, float]:
    """The state entries of ``ledger``."""
    return {release.key(): float(count) for release, count in ledger.items() if count}


def added(ledger: Ledger, release: Release, count: int = 1) -> Ledger:
    out = dict(ledger)
    out[release] = out.get(release, 0) + count
    return out


def relation_problem(ledger: Ledger, release: Release) -> str | None:
    """Why ``release`` cannot be composed with the releases in ``ledger`` (None: it can)."""
    others = [r for r in ledger if r.scheme.replace_one != release.scheme.replace_one]
    if not others:
        return None
    return (
        f"this run's past releases ({others[0].scheme.describe()}) were accounted under "
        f"{others[0].scheme.adjacency.split(' (')[0]}, but it now releases "
        f"{release.scheme.describe()}, accounted under "
        f"{release.scheme.adjacency.split(' (')[0]}: dp-accounting cannot compose the two; "
        "resume with the server.sampler it started with, or start a new run"
    )


def _event(release: Release, replace_one: bool) -> dp_event.DpEvent:
    """The release's event under the ledger's relation: under replace-one a full
    participation's sum moves by 2 record bounds (the release under add-or-remove: one)."""
    from dp_accounting import dp_event

    from fedforge.privacy.accounting import round_event

    scheme, z = release.scheme, release.noise_multiplier
    if replace_one and scheme.kind == "full":
        return dp_event.GaussianDpEvent(z / 2)
    return round_event(scheme, z)


@lru_cache(maxsize=64)
def _one_rdp(release: Release, replace_one: bool) -> tuple[np.ndarray, np.ndarray]:
    from dp_accounting import privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    relation = privacy_accountant.NeighboringRelation
    accountant = rdp_privacy_accountant.RdpAccountant(
        neighboring_relation=relation.REPLACE_ONE if replace_one else relation.ADD_OR_REMOVE_ONE
    )
    accountant.compose(_event(release, replace_one), 1)
    return accountant.orders, accountant.rdp


def ledger_epsilon(ledger: Ledger, delta: float, kind: AccountantKind = "pld") -> float:
    """Epsilon at ``delta`` of every release in ``ledger`` composed (dp-accounting: RDP adds
    up, PLDs convolve)."""
    segments = [(r, n) for r, n in ledger.items() if n > 0]
    if not segments:
        return 0.0
    if len(segments) == 1:  # the common case: the cached, incremental path
        ((release, count),) = segments
        return epsilon(release.scheme, release.noise_multiplier, count, delta, kind)
    replace_one = {r.scheme.replace_one for r, _ in segments}
    if len(replace_one) > 1:
        raise ConfigError(relation_problem({segments[0][0]: 1}, segments[-1][0]) or "")
    replace = replace_one.pop()
    if any(r.noise_multiplier <= 0 for r, _ in segments):
        return float("inf")
    if replace or accountant_for(segments[0][0].scheme, kind) == "rdp":
        from dp_accounting.rdp import rdp_privacy_accountant

        rdps = [(_one_rdp(release, replace), count) for release, count in segments]
        orders = rdps[0][0][0]
        total = sum((count * one for (_, one), count in rdps), np.zeros_like(orders))
        eps, _ = rdp_privacy_accountant.compute_epsilon(orders, total, delta)
        return float(eps)
    # PLDs convolve: each segment's composition is cached (the growing one extended by a
    # round at a time), then the segments are convolved together.
    first, *rest = (composed_pld(r.scheme, r.noise_multiplier, n) for r, n in segments)
    for pld in rest:
        first = first.compose(pld)
    return float(first.get_epsilon_for_delta(delta))
