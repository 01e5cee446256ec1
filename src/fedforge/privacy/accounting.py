"""Privacy accounting with Google's ``dp-accounting``: never a hand-written epsilon formula.

A round of central DP releases one (or, with adaptive clipping, two) Gaussian mechanisms on
the clients sampled in it; how clients are sampled is part of the accounting:

- ``poisson``: each client independently with rate q, the Poisson-subsampled Gaussian, under
  add-or-remove-one-client adjacency (PLD by default, RDP as an option);
- ``fixed``: exactly K of N clients without replacement, the matching without-replacement
  event, which ``dp-accounting`` supports only in its RDP accountant and only under
  replace-one-client adjacency, so that scheme always uses RDP (the report says so);
- ``full``: every client every round, plain composition (no amplification).

Over-selection (``keep``): the round sums only the first ``keep`` of the clients drawn to
finish. For ``fixed`` the replace-one event already bounds it (replacing a client's data moves
its own record and at most which other client fills the last kept place: 2C); for ``full`` a
client added (or replaced) can displace another kept one, so the sum moves by up to 2C and
the release is the Gaussian of half the multiplier. Poisson sampling refuses it (adding one
client would evict another: not the Poisson event's C).

Every attempt that released an aggregate is one release, including round attempts that
were discarded and re-sampled: the noisy sum was computed, so it is paid for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

import numpy as np

if TYPE_CHECKING:  # dp-accounting costs 1.3 s to import: only runs that account pay it
    from dp_accounting import dp_event, privacy_accountant
    from dp_accounting.pld import privacy_loss_distribution

from fedforge.core.errors import ConfigError

AccountantKind = Literal["pld", "rdp"]
SchemeKind = Literal["poisson", "fixed", "full"]

# Coarser than the library's 1e-4 default: 10x faster per round. The pessimistic
# discretization only rounds epsilon up: by < 0.2% at 1,000 releases of q = 0.01, sigma = 1,
# and by 1.4% at 10,000 releases of q = 0.01, sigma = 4.
PLD_DISCRETIZATION = 1e-3


@dataclass(frozen=True)
class SamplingScheme:
    """How the clients of one round are drawn from the ``population``."""

    kind: SchemeKind
    population: int
    rate: float = 1.0  # poisson: inclusion probability
    sample_size: int = 0  # fixed: clients per round
    keep: int = 0  # over-selection: the first ``keep`` drawn to finish are summed (0: all)

    def __post_init__(self) -> None:
        if self.population < 1:
            raise ConfigError("privacy accounting needs a population of at least one client")
        if self.kind == "poisson" and not 0 < self.rate <= 1:
            raise ConfigError(f"poisson sampling rate must be in (0, 1], got {self.rate}")
        if self.kind == "fixed" and not 1 <= self.sample_size <= self.population:
            raise ConfigError(
                f"fixed-size sampling needs 1 <= clients per round <= population, got "
                f"{self.sample_size} of {self.population}"
            )
        if self.keep and self.kind == "poisson":
            raise ConfigError(
                "central DP cannot keep only the first clients of a Poisson sample to "
                "finish (over-selection): adding one client can evict another, so the sum "
                "moves by 2 clip norms, not the 1 the Poisson event accounts; use K of N"
            )
        if not 0 <= self.keep < max(self.drawn, 1):
            raise ConfigError(
                f"over-selection must keep fewer clients than it draws, got {self.keep} "
                f"of {self.drawn}"
            )

    @classmethod
    def fixed_size(cls, sample_size: int, population: int, keep: int = 0) -> SamplingScheme:
        """K of N without replacement; all of them is full participation. ``keep``: only
        the first ``keep`` to finish are summed (over-selection; 0 or >= K: all of them)."""
        drawn = min(sample_size, population)
        kept = keep if 0 < keep < drawn else 0
        if sample_size >= population:
            return cls("full", population, keep=kept)
        return cls("fixed", population, sample_size=sample_size, keep=kept)

    @property
    def drawn(self) -> float:
        """The expected number of clients the sampler draws."""
        if self.kind == "poisson":
            return self.rate * self.population
        if self.kind == "fixed":
            return float(self.sample_size)
        return float(self.population)

    @property
    def expected_clients(self) -> float:
        """The expected number of clients summed: those drawn, or the ``keep`` kept."""
        return float(self.keep) if self.keep else self.drawn

    @property
    def replace_one(self) -> bool:
        """Whether the scheme is accounted under replace-one-client adjacency (K of N, the
        without-replacement event); the others under add-or-remove-one-client."""
        return self.kind == "fixed"

    @property
    def adjacency(self) -> str:
        """The neighbouring relation epsilon is for, in words."""
        if self.replace_one:
            return "replace-one client (its data swapped for any other's)"
        return "add/remove one client (the population size is public)"

    def describe(self) -> str:
        kept = f", the first {self.keep} to finish summed" if self.keep else ""
        if self.kind == "poisson":
            return f"Poisson sampling, q = {self.rate:g} of {self.population} clients"
        if self.kind == "fixed":
            return f"{self.sample_size} of {self.population} clients without replacement{kept}"
        if self.keep:
            return (
                f"full participation of {self.population} clients{kept} (a client can "
                "displace another: sensitivity 2 clip norms)"
            )
        return f"full participation of {self.population} clients"


def round_event(scheme: SamplingScheme, noise_multiplier: float) -> dp_event.DpEvent:
    """The DP event of one release: Gaussian noise of ``noise_multiplier`` times the clip norm
    C on the sum of the sampled clients' clipped records.

    An event's noise multiplier is the noise stddev over the sum's sensitivity under the
    event's adjacency. Adding or removing a client moves the sum by at most C; *replacing*
    one (the without-replacement event's adjacency) by up to 2C, so there the multiplier
    the accountant sees is halved, and so it is for full participation thinned by
    over-selection (a client's arrival can displace another)."""
    from dp_accounting import dp_event

    if scheme.kind == "poisson":
        return dp_event.PoissonSampledDpEvent(
            scheme.rate, dp_event.GaussianDpEvent(noise_multiplier)
        )
    if scheme.kind == "fixed":
        return dp_event.SampledWithoutReplacementDpEvent(
            scheme.population, scheme.sample_size, dp_event.GaussianDpEvent(noise_multiplier / 2)
        )
    return dp_event.GaussianDpEvent(noise_multiplier / 2 if scheme.keep else noise_multiplier)


def accountant_for(scheme: SamplingScheme, requested: AccountantKind) -> AccountantKind:
    """The accountant that can account ``scheme``: RDP for fixed-size sampling (the only one
    in ``dp-accounting`` with a without-replacement event), the requested one otherwise."""
    return "rdp" if scheme.kind == "fixed" else requested


def fresh_accountant(
    scheme: SamplingScheme, kind: AccountantKind
) -> privacy_accountant.PrivacyAccountant:
    from dp_accounting import privacy_accountant
    from dp_accounting.pld import pld_privacy_accountant
    from dp_accounting.rdp import rdp_privacy_accountant

    if accountant_for(scheme, kind) == "rdp":
        relation = (
            privacy_accountant.NeighboringRelation.REPLACE_ONE
            if scheme.kind == "fixed"
            else privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE
        )
        return rdp_privacy_accountant.RdpAccountant(neighboring_relation=relation)
    return pld_privacy_accountant.PLDAccountant(value_discretization_interval=PLD_DISCRETIZATION)


@lru_cache(maxsize=64)
def _round_rdp(scheme: SamplingScheme, noise_multiplier: float) -> tuple[np.ndarray, np.ndarray]:
    """(orders, RDP of one release) from the RDP accountant; RDP composes by addition."""
    accountant = fresh_accountant(scheme, "rdp")
    accountant.compose(round_event(scheme, noise_multiplier), 1)
    return accountant.orders, accountant.rdp


_LAST_PLD: dict[
    tuple[SamplingScheme, float], tuple[int, privacy_loss_distribution.PrivacyLossDistribution]
] = {}


def composed_pld(
    scheme: SamplingScheme, noise_multiplier: float, releases: int
) -> privacy_loss_distribution.PrivacyLossDistribution:
    """The PLD of ``releases`` rounds: the composition the PLD accountant performs, with the
    one-round PLD cached and, as a run asks every round, the previous count's composition
    extended by one round (one convolution instead of a self-composition: 3x faster)."""
    base = _round_pld(scheme, noise_multiplier)
    key = (scheme, noise_multiplier)
    last = _LAST_PLD.get(key)
    if last is not None and last[0] == releases:
        return last[1]
    if last is not None and last[0] == releases - 1:
        pld = last[1].compose(base)
    else:
        pld = base.self_compose(releases)
    if len(_LAST_PLD) >= 8:  # calibration tries many noise multipliers: keep memory bounded
        _LAST_PLD.clear()
    _LAST_PLD[key] = (releases, pld)
    return pld


@lru_cache(maxsize=64)
def _round_pld(
    scheme: SamplingScheme, noise_multiplier: float
) -> privacy_loss_distribution.PrivacyLossDistribution:
    from dp_accounting.pld import privacy_loss_distribution

    return privacy_loss_distribution.from_gaussian_mechanism(
        standard_deviation=noise_multiplier / 2 if scheme.keep else noise_multiplier,
        sampling_prob=scheme.rate if scheme.kind == "poisson" else 1.0,
        value_discretization_interval=PLD_DISCRETIZATION,
    )


@lru_cache(maxsize=256)
def epsilon(
    scheme: SamplingScheme,
    noise_multiplier: float,
    releases: int,
    delta: float,
    kind: AccountantKind = "pld",
) -> float:
    """Epsilon at ``delta`` after ``releases`` rounds (inf when the noise is zero)."""
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    if accountant_for(scheme, kind) == "pld":
        return float(composed_pld(scheme, noise_multiplier, releases).get_epsilon_for_delta(delta))
    # What the RDP accountant computes for ``releases`` compositions (RDP adds up), with the
    # one-release RDP cached: the without-replacement bound costs ~0.4 s per evaluation.
    orders, one = _round_rdp(scheme, noise_multiplier)
    from dp_accounting.rdp import rdp_privacy_accountant

    eps, _ = rdp_privacy_accountant.compute_epsilon(orders, releases * one, delta)
    return float(eps)


def gaussian_epsilon(noise_multiplier: float, delta: float, kind: AccountantKind = "pld") -> float:
    """Epsilon at ``delta`` of one Gaussian mechanism of ``noise_multiplier`` (noise over the
    sensitivity). PLD: dp-accounting's exact hockey-stick divergence of the Gaussian privacy
    loss, inverted by bisection (a discretized PLD of a multiplier far below 1 is too wide
    to build: 70 s for 0.016); RDP: its accountant."""
    if noise_multiplier <= 0:
        return math.inf
    if kind == "rdp":
        return epsilon(SamplingScheme("full", 1), noise_multiplier, 1, delta, "rdp")
    from dp_accounting.pld.privacy_loss_mechanism import GaussianPrivacyLoss

    loss = GaussianPrivacyLoss(noise_multiplier)
    if loss.get_delta_for_epsilon(0.0) <= delta:
        return 0.0
    low, high = 0.0, 1.0
    while loss.get_delta_for_epsilon(high) > delta:
        low, high = high, 2 * high
    while high - low > 1e-10 * high:
        middle = (low + high) / 2
        low, high = (middle, high) if loss.get_delta_for_epsilon(middle) > delta else (low, middle)
    return high  # the end of the bracket at or below delta: never under-reports


def zcdp_epsilon(rho: float, delta: float) -> float:
    """Epsilon at ``delta`` of a ``rho``-zCDP mechanism (dp-accounting's RDP conversion);
    zCDP composes by adding rho."""
    if rho <= 0:
        return 0.0
    if delta <= 0:
        return math.inf
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    accountant = RdpAccountant()
    accountant.compose(dp_event.ZCDpEvent(rho))
    return float(accountant.get_epsilon(delta))


def calibrate_noise_multiplier(
    target_epsilon: float,
    delta: float,
    scheme: SamplingScheme,
    releases: int,
    kind: AccountantKind = "pld",
    rtol: float = 1e-4,
) -> float:
    """The smallest noise multiplier (within ``rtol``) whose ``releases`` rounds end at or
    below ``target_epsilon``: bisection in log space over :func:`epsilon`, which decreases
    in the noise multiplier; the returned end of the bracket never exceeds the target."""
    if target_epsilon <= 0:
        raise ConfigError(f"privacy.target_epsilon must be > 0, got {target_epsilon}")

    def within(z: float) -> bool:
        return epsilon(scheme, z, releases, delta, kind) <= target_epsilon

    low, high = 0.25, 1.0
    while not within(high):
        low, high = high, 2 * high
        if high > 1e4:
            raise ConfigError(
                f"privacy.target_epsilon = {target_epsilon:g} is out of reach: even noise "
                f"multiplier {high:g} ends above it"
            )
    while within(low):
        low, high = low / 2, low
        if low < 1e-3:
            raise ConfigError(
                f"privacy.target_epsilon = {target_epsilon:g} is met without meaningful "
                "noise; set privacy.noise_multiplier instead"
            )
    while high / low > 1 + rtol:
        middle = math.sqrt(low * high)
        low, high = (low, middle) if within(middle) else (middle, high)
    return high


def adaptive_value_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Andrew et al. 2021: the value noise multiplier z_v with
    z_v^-2 + (2 sigma_b)^-2 = z^-2, so the update and the noised clipped count (sensitivity
    1/2 after centring) together cost what one Gaussian of multiplier z costs."""
    if count_stddev <= 0:
        raise ConfigError("adaptive clipping under DP needs a positive count noise stddev")
    remainder = noise_multiplier**-2 - (2 * count_stddev) ** -2
    if remainder <= 0:
        raise ConfigError(
            f"adaptive clipping cannot reach noise multiplier {noise_multiplier:g}: the "
            f"clipped-count noise (stddev {count_stddev:g}) alone already costs more "
            f"(2 x stddev must exceed the noise multiplier); sample more clients per round "
            f"(sigma_b = expected clients / 20) or raise the noise multiplier"
        )
    return float(remainder**-0.5)
