"""When central DP's amplification by sampling holds for the clients a round actually sums.

The accountant (``accounting.py``) assumes each release sums a sample drawn by its scheme:
``fixed`` (K of N uniformly, replace-one adjacency) or ``poisson`` (each client independently
with rate q, add-or-remove adjacency). The clients whose records enter the noised sum are
that sample thinned by the round: the virtual clock's deadline and over-selection, stragglers,
partial availability. Thinning keeps the guarantee only in the cases derived in the README
(Differential privacy, Accounting); :func:`sampling_problem` refuses the others, for runs
built from a configuration and from the Python API alike.
"""

from __future__ import annotations

from fedforge.privacy.accounting import SamplingScheme
from fedforge.runtime.clock import VirtualClock
from fedforge.runtime.sampling import PoissonSampler, Sampler, UniformSampler
from fedforge.runtime.stragglers import Stragglers


def sampler_scheme(sampler: Sampler, population: int) -> SamplingScheme | None:
    """The scheme ``sampler`` draws from ``population`` clients (None: not a known one)."""
    if isinstance(sampler, UniformSampler):
        return SamplingScheme.fixed_size(sampler.per_round, population)
    if isinstance(sampler, PoissonSampler):
        if sampler.rate >= 1:
            return SamplingScheme("full", population)
        return SamplingScheme("poisson", population, rate=sampler.rate)
    return None


def sampling_problem(
    scheme: SamplingScheme,
    sampler: Sampler,
    population: int,
    clock: VirtualClock | None = None,
    stragglers: Stragglers | None = None,
) -> str | None:
    """Why the clients summed each round are not a sample the accountant's ``scheme`` bounds
    (None: they are).

    - The sampler must draw ``scheme`` over ``population``: with over-selection the scheme
      counts the clients drawn, not the ones kept.
    - Full participation has no amplification to lose.
    - K of N needs every client online all the time: drawn from the ~M online clients, an
      online client is summed with probability K/M, not K/N.
    - Poisson sampling needs fixed-length rounds when availability is partial (otherwise who
      is online later depends on who took part earlier), and no stragglers (their share is
      a count of the sampled clients, so one client's presence changes others' work).
    """
    drawn = sampler_scheme(sampler, population)
    if drawn is None:
        return (
            f"central DP accounts amplification by sampling for UniformSampler and "
            f"PoissonSampler only, not {type(sampler).__name__}"
        )
    if drawn != scheme:
        return (
            f"central DP is accounted for {scheme.describe()}, but the sampler draws "
            f"{drawn.describe()}"
        )
    if scheme.kind == "full":
        return None
    partial = clock is not None and not clock.devices.always_online
    if scheme.kind == "fixed" and partial:
        return (
            "central DP with K of N clients cannot run with partial availability: K drawn "
            "from the clients online at the time are each summed far more often than K/N; "
            "use Poisson sampling with fixed-length rounds (a deadline)"
        )
    if scheme.kind == "poisson":
        if partial and not (clock is not None and clock.fixed_rounds):
            return (
                "central DP with Poisson sampling among the online clients needs rounds of "
                "a fixed length (a deadline every round lasts): otherwise who is online in a "
                "later round depends on who took part in an earlier one"
            )
        if stragglers is not None and stragglers.fraction > 0:
            return (
                "central DP with Poisson sampling cannot simulate stragglers: their number "
                "is a share of the sampled clients, so one client's presence changes who "
                "else does partial work or is dropped"
            )
    return None
