"""Gaussian-mechanism stages: central DP on the server's sum, local DP on each client.

:class:`CentralGaussian` is DP-FedAvg (McMahan et al. 2018). Clients clip their records (a
clip stage before this one); the server sums the records with bounded weights, adds
``N(0, (z_v C)^2)`` to the sum and divides by a fixed denominator (the expected sum of
weights), never by the realized count, so one client changes the result by at most
``C / denominator`` whoever else took part. With adaptive clipping the clipped count is
noised too (stddev ``sigma_b``) and the value multiplier ``z_v`` is lowered so that both
releases together cost one Gaussian of multiplier ``z`` (Andrew et al. 2021). Epsilon is
accounted by ``dp-accounting`` per release: every attempt that summed records.

:class:`LocalGaussian` adds ``N(0, (z C)^2)`` to each clipped record on the client, before it
leaves. Any two records within the clip ball differ by at most ``2C``, so one release costs a
Gaussian of multiplier ``z / 2``; a client's epsilon composes over the rounds it took part in
(the server knows who took part, so sampling does not amplify it) and the history reports
the epsilon of the client that took part most.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np

from fedforge.aggregate.kinds import Aggregate
from fedforge.core.errors import ConfigError
from fedforge.core.records import RecordBatch
from fedforge.privacy import ledger
from fedforge.privacy.accounting import (
    AccountantKind,
    SamplingScheme,
    accountant_for,
    adaptive_value_multiplier,
    epsilon,
    gaussian_epsilon,
    zcdp_epsilon,
)
from fedforge.privacy.ledger import Release
from fedforge.privacy.noise import NoiseSource
from fedforge.stages.base import StageDefaults, StageState, SumContext

Weighting = Literal["uniform", "capped"]

# Tolerance on a target epsilon: calibration lands within it, and a release that ends within
# it of the budget is allowed.
BUDGET_SLACK = 1e-6


def capped_weights(num_examples: np.ndarray, cap: float) -> np.ndarray:
    """McMahan et al.'s bounded weights ``min(n / cap, 1)``, in [0, 1]."""
    return np.minimum(num_examples.astype(np.float64) / cap, 1.0)


@dataclass(frozen=True)
class CentralGaussian(StageDefaults):
    """Central DP: Gaussian noise on the sum of clipped records, a fixed denominator."""

    noise_multiplier: float
    scheme: SamplingScheme
    delta: float
    denominator: float
    clip: str = "clip"  # the clip stage whose norm bounds each record
    count_stddev: float | None = None  # adaptive clipping: sigma_b on the clipped count
    weighting: Weighting = "uniform"
    weight_cap: float | None = None  # capped: examples at which a client's weight is 1
    accountant: AccountantKind = "pld"
    target_epsilon: float | None = None
    source: NoiseSource = field(default_factory=NoiseSource)
    # The expected number of clients summed (default: the scheme's, which counts the
    # clients kept when over-selection keeps only the first to finish).
    expected_clients: float | None = None
    # The bound on one record's norm in the sum, in clip norms: above 1 when secure
    # aggregation's stochastic rounding can push a record past the clip (privacy/guards.py).
    record_bound: float = 1.0
    name: str = "dp"
    position: str = "noise"
    commutes_with_sum: bool = True
    releases_when_empty: bool = True  # a round with no record still releases noise

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")
        if not self.denominator > 0:
            raise ValueError(f"the fixed denominator must be > 0, got {self.denominator}")
        if self.weighting == "capped" and not (self.weight_cap and self.weight_cap > 0):
            raise ValueError("capped weighting needs a positive weight cap")
        if not self.record_bound >= 1:
            raise ValueError(f"the record bound is at least 1 clip norm, got {self.record_bound}")
        self.value_multiplier  # noqa: B018  (refuses an impossible adaptive configuration)

    @property
    def value_multiplier(self) -> float:
        """The multiplier of the noise on the update (``z``, or ``z_v`` when adaptive)."""
        if self.count_stddev is None:
            return self.noise_multiplier
        return adaptive_value_multiplier(self.noise_multiplier, self.count_stddev)

    @property
    def accountant_used(self) -> AccountantKind:
        return accountant_for(self.scheme, self.accountant)

    @property
    def expected_summed(self) -> float:
        """The public expected number of clients in the sum."""
        if self.expected_clients is None:
            return self.scheme.expected_clients
        return self.expected_clients

    @property
    def release(self) -> Release:
        """What one release of this stage is accounted as: its scheme, and the noise over
        the bound on a record's norm (``z / record_bound``)."""
        return Release(self.scheme, self.noise_multiplier / self.record_bound)

    def init_state(self) -> StageState:
        return {"releases": 0.0, **self._settings()}

    def _settings(self) -> StageState:
        """What this run's releases are accounted at; a resumed run may change the mechanism
        (the ledger composes every segment) but not the delta or the accountant."""
        return {
            "noise_multiplier": self.noise_multiplier,
            "delta": self.delta,
            "accountant_rdp": float(self.accountant == "rdp"),
            "expected_clients": self.expected_summed,
            "population": float(self.scheme.population),
        }

    def _ledger(self, state: StageState) -> ledger.Ledger:
        """The releases paid for so far: the state's segments (a checkpoint from before
        the ledger counted them all as this stage's releases, its settings unchanged)."""
        past = ledger.read(state)
        if not past and state.get("releases", 0.0) > 0:
            past = {self.release: int(state["releases"])}
        return past

    def _check_settings(self, state: StageState) -> None:
        """Refuse a resume whose releases cannot be composed with the past ones."""
        now = self._settings()
        fixed = ["delta", "accountant_rdp"]
        if self.target_epsilon is not None or not ledger.read(state):
            # A calibrated noise multiplier assumed one mechanism for every round; a
            # checkpoint from before the ledger knows only its settings.
            fixed += ["noise_multiplier", "population"]
            if not ledger.read(state):
                fixed.append("expected_clients")
        changed = [k for k in fixed if k in state and state[k] != now[k]]
        if changed:
            raise ConfigError(
                f"privacy settings changed since this run started ({', '.join(changed)}: "
                f"{', '.join(f'{state[k]:g} -> {now[k]:g}' for k in changed)}); "
                "its past releases were accounted with the old ones: resume with the same "
                "privacy and server settings (server.rounds included when target_epsilon "
                "calibrates the noise), or start a new run"
            )
        problem = ledger.relation_problem(self._ledger(state), self.release)
        if problem:
            raise ConfigError(problem)

    def spent(self, state: StageState, more: int = 0) -> float:
        """Epsilon of every release in ``state``'s ledger and ``more`` of this stage's."""
        total = ledger.added(self._ledger(state), self.release, more)
        return ledger.ledger_epsilon(total, self.delta, self.accountant)

    def weights(self, batch: RecordBatch, weights: np.ndarray) -> np.ndarray:
        if self.weighting == "capped":
            assert self.weight_cap is not None
            return capped_weights(batch.num_examples, self.weight_cap)
        return np.ones(len(batch))

    def on_sum(self, aggregate: Aggregate, state: StageState, context: SumContext) -> Aggregate:
        norm = context.broadcast[f"{self.clip}.norm"]
        std = self.value_multiplier * norm
        arrays = {}
        for index, (name, mean) in enumerate(sorted(aggregate.arrays.items())):
            total = mean.astype(np.float64) * aggregate.total_weight
            total += self.source.gaussian(
                mean.shape, std, "central", context.round, context.attempt, index
            )
            arrays[name] = (total / self.denominator).astype(mean.dtype)
        # Only noised values leave this stage: the clipped count when it is noised (adaptive
        # clipping needs it), nothing of the other summed scalars.
        scalars = {}
        count_key = f"{self.clip}.clipped"
        if self.count_stddev is not None:
            # Andrew et al.: each client contributes its bit centred, b - 1/2 (sensitivity 1/2,
            # what the noise split assumes); the public expected count re-adds the centre.
            noise = self.source.gaussian(
                (1,), self.count_stddev, "count", context.round, context.attempt
            )
            centred = aggregate.scalars.get(count_key, 0.0) - aggregate.count / 2
            scalars[count_key] = centred + float(noise[0]) + self.expected_summed / 2
        return replace(aggregate, arrays=arrays, scalars=scalars)

    def epsilon_after(self, releases: int) -> float:
        """Epsilon after ``releases`` of this stage's releases (a run started afresh)."""
        release = self.release
        scheme, z = release.scheme, release.noise_multiplier
        return epsilon(scheme, z, releases, self.delta, self.accountant)

    def finish_round(
        self, state: StageState, aggregate: Aggregate
    ) -> tuple[StageState, dict[str, float]]:
        self._check_settings(state)
        releases = int(state["releases"]) + 1
        spent = ledger.added(self._ledger(state), self.release)
        new_state = {"releases": float(releases), **self._settings(), **ledger.entries(spent)}
        return new_state, {
            "dp.epsilon": ledger.ledger_epsilon(spent, self.delta, self.accountant),
            "dp.delta": self.delta,
            "dp.noise_multiplier": self.noise_multiplier,
            "dp.value_noise_multiplier": self.value_multiplier,
            "dp.releases": float(releases),
        }

    def labels(self) -> dict[str, str]:
        bound = f", records bounded by {self.record_bound:g} C" if self.record_bound > 1 else ""
        return {
            "dp.mode": "central" + (" (adaptive clipping)" if self.count_stddev else ""),
            "dp.sampling": self.scheme.describe() + bound,
            "dp.accountant": self.accountant_used,
            "dp.adjacency": self.scheme.adjacency,
            "dp.noise": self.source.describe(),
        }

    def budget_problem(self, state: StageState) -> str | None:
        self._check_settings(state)
        if self.target_epsilon is None:
            return None
        releases = int(state["releases"])
        after = self.spent(state, 1)
        if after <= self.target_epsilon + BUDGET_SLACK:
            return None
        return (
            f"privacy budget reached: {releases} releases spent epsilon "
            f"{self.spent(state):.4g}; one more would reach {after:.4g} > "
            f"privacy.target_epsilon = {self.target_epsilon:g} (delta {self.delta:g})"
        )


@dataclass(frozen=True)
class LocalGaussian(StageDefaults):
    """Local DP: each client noises its own clipped record before it leaves the client."""

    noise_multiplier: float
    delta: float
    clip: str = "clip"
    accountant: AccountantKind = "pld"
    source: NoiseSource = field(default_factory=NoiseSource)
    name: str = "ldp"
    position: str = "noise"
    commutes_with_sum: bool = True
    # The ledger moves with rejected records too, and epsilon is reported every round (one
    # in which nothing was accepted carries it forward).
    reports_when_empty = True

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ValueError(f"noise multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    def encode(
        self, batch: RecordBatch, broadcast: Mapping[str, float], seeds: Sequence[int]
    ) -> RecordBatch:
        std = self.noise_multiplier * broadcast[f"{self.clip}.norm"]
        arrays = {name: arr.copy() for name, arr in sorted(batch.arrays.items())}
        for row, seed in enumerate(seeds):
            for index, name in enumerate(arrays):
                block = arrays[name][row]
                block += self.source.gaussian(block.shape, std, "local", seed, index)
        return batch.replace_arrays(arrays)

    def labels(self) -> dict[str, str]:
        return {
            "dp.mode": "local",
            "dp.sampling": "none (each client composes over every record it sent)",
            "dp.accountant": self.accountant,
            "dp.adjacency": "replace-one client's record (who took part is public)",
            "dp.noise": self.source.describe(),
        }

    @property
    def load(self) -> float:
        """What one release adds to a client's Gaussian load ``sum (sensitivity / std)^2``:
        any two records within the clip ball differ by at most 2C, so ``(2 / z)^2``."""
        return (2 / self.noise_multiplier) ** 2

    def epsilon_of(self, load: float) -> float:
        """Epsilon of Gaussian releases of total ``load``: composed Gaussians are exactly one
        Gaussian of multiplier ``load^-1/2`` (their privacy losses add up), so releases at
        different noise multipliers (a resumed run) compose exactly."""
        if load <= 0:
            return 0.0
        return gaussian_epsilon(load**-0.5, self.delta, self.accountant)

    def epsilon_after(self, releases: int) -> float:
        """A client's epsilon after ``releases`` records at this noise multiplier."""
        return self.epsilon_of(releases * self.load)

    def init_state(self) -> StageState:
        return {"delta": self.delta, "accountant_rdp": float(self.accountant == "rdp")}

    def finish_round(
        self, state: StageState, aggregate: Aggregate
    ) -> tuple[StageState, dict[str, float]]:
        """Count every record that reached the server, summed or not (rejected, or in a
        refused round): the server is the adversary local DP protects against, and it saw
        them all."""
        check_unchanged(state, self.init_state())
        new_state = {**state, **self.init_state()}
        for cid in [*aggregate.client_ids, *aggregate.unsummed]:
            count = new_state.get(f"releases.{cid}", 0.0)
            if f"load.{cid}" not in new_state:  # (a checkpoint from before loads were kept)
                new_state[f"load.{cid}"] = count * self.load
            new_state[f"releases.{cid}"] = count + 1.0
            new_state[f"load.{cid}"] += self.load
        # Clients of a checkpoint from before loads were kept, not seen since.
        for key in [k for k in new_state if k.startswith("releases.")]:
            new_state.setdefault("load." + key[len("releases.") :], new_state[key] * self.load)
        most = max((v for k, v in new_state.items() if k.startswith("releases.")), default=0.0)
        heaviest = max((v for k, v in new_state.items() if k.startswith("load.")), default=0.0)
        return new_state, {
            "dp.epsilon": self.epsilon_of(heaviest),
            "dp.delta": self.delta,
            "dp.noise_multiplier": self.noise_multiplier,
            "dp.releases": float(most),
        }


def check_unchanged(state: StageState, now: StageState) -> None:
    """Refuse a resumed run whose ``now`` settings (delta, accountant) differ from those its
    past releases were reported at: epsilon at another delta or from another accountant is
    not the same budget, and could fall below what was already reported."""
    changed = [k for k, v in now.items() if k in state and state[k] != v]
    if changed:
        raise ConfigError(
            f"privacy settings changed since this run started ({', '.join(changed)}: "
            f"{', '.join(f'{state[k]:g} -> {now[k]:g}' for k in changed)}); its past "
            "releases were reported with the old ones: resume with the same privacy.delta "
            "and privacy.accountant, or start a new run"
        )


@dataclass(frozen=True)
class DistributedGaussian(StageDefaults):
    """Distributed DP over secure aggregation (the distributed discrete Gaussian, Kairouz et
    al. 2021): every client adds discrete Gaussian noise to its clipped record in the integer
    ring before masking, so the server only ever sees a sum that carries ``N(0, (zC)^2)``
    worth of noise. The secure sum reports what each release cost (zCDP ``rho`` from the
    realized number of contributors under replace-one adjacency, including the term for how
    far a sum of discrete Gaussians is from one: ``privacy/discrete_gaussian.py``); rho adds
    up over rounds, whatever the settings of each, and epsilon is reported at ``delta``. The
    server knows who took part, so sampling is not counted as amplification. The sum is
    divided by a fixed denominator (the expected number of clients)."""

    noise_multiplier: float
    clip_norm: float
    delta: float
    denominator: float
    name: str = "ddp"
    position: str = "noise"
    commutes_with_sum: bool = True
    reports_when_empty = True  # a round whose secure sum aborted carries epsilon forward

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and self.clip_norm > 0 and self.denominator > 0):
            raise ValueError("distributed DP needs z, the clip norm and a denominator > 0")
        if not 0 < self.delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {self.delta}")

    def init_state(self) -> StageState:
        return {"rho": 0.0, "releases": 0.0, "replace_one": 1.0, "delta": self.delta}

    def broadcast(self, state: StageState) -> dict[str, float]:
        # Read by the secure aggregation session, which spreads it over the clients.
        return {"ddg.noise_std": self.noise_multiplier * self.clip_norm}

    def weights(self, batch: RecordBatch, weights: np.ndarray) -> np.ndarray:
        return np.ones(len(batch))

    def on_sum(self, aggregate: Aggregate, state: StageState, context: SumContext) -> Aggregate:
        if "ddg.rho" not in aggregate.scalars:
            raise ConfigError("distributed DP needs aggregation.kind = 'secure_sum'")
        arrays = {
            name: (mean.astype(np.float64) * aggregate.total_weight / self.denominator).astype(
                mean.dtype
            )
            for name, mean in aggregate.arrays.items()
        }
        return replace(aggregate, arrays=arrays)

    def finish_round(
        self, state: StageState, aggregate: Aggregate
    ) -> tuple[StageState, dict[str, float]]:
        check_unchanged(state, {"delta": self.delta})
        rho = state["rho"]
        if "replace_one" not in state:  # a checkpoint from before replace-one: rho at Delta
            rho *= 4  # = C; at 2 Delta each past release costs at most 4 x (tau term too)
        released = "ddg.rho" in aggregate.scalars
        new = {
            **self.init_state(),
            "rho": rho + aggregate.scalars.get("ddg.rho", 0.0),
            "releases": state["releases"] + released,
        }
        return new, {
            "dp.epsilon": zcdp_epsilon(new["rho"], self.delta),
            "dp.delta": self.delta,
            "dp.noise_multiplier": self.noise_multiplier,
            "dp.rho": new["rho"],
            "dp.releases": new["releases"],
        }

    def labels(self) -> dict[str, str]:
        return {
            "dp.mode": "distributed (discrete Gaussian added by each client, secure sum)",
            "dp.sampling": "none (the server knows who took part)",
            "dp.accountant": "zCDP (dp-accounting RDP conversion)",
            "dp.adjacency": "replace-one client's record (who took part is public)",
            "dp.noise": "discrete Gaussian, AES-256-CTR keyed from os.urandom on each client",
        }


def ends_above(stage: CentralGaussian | LocalGaussian, releases: int, limit: float) -> bool:
    """Whether ``releases`` releases end above epsilon ``limit``."""
    value = stage.epsilon_after(releases)
    return math.isinf(value) or value > limit
