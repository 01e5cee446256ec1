"""When central DP's amplification by sampling holds for the clients a round actually sums.

The accountant (``accounting.py``) assumes each release sums a sample drawn by its scheme:
``fixed`` (K of N uniformly, replace-one adjacency), ``poisson`` (each client independently
with rate q, add-or-remove adjacency) or ``full`` (everyone, add-or-remove), each possibly
keeping only the first to finish (over-selection, part of the scheme). The clients whose
records enter the noised sum are that sample thinned by the round: the virtual clock's
deadline and over-selection, stragglers, partial availability. Thinning keeps the guarantee
only in the cases derived in the README (Differential privacy, Accounting);
:func:`sampling_problem` refuses the others, for runs built from a configuration and from the
Python API alike.
"""

from __future__ import annotations

from fedforge.core.errors import ConfigError
from fedforge.privacy.accounting import SamplingScheme
from fedforge.runtime.clock import VirtualClock
from fedforge.runtime.sampling import PoissonSampler, Sampler, UniformSampler
from fedforge.runtime.stragglers import Stragglers


def sampler_scheme(sampler: Sampler, population: int, keep: int = 0) -> SamplingScheme | None:
    """The scheme ``sampler`` draws from ``population`` clients, the first ``keep`` to finish
    summed (0: all of them); None: not a known sampler."""
    if isinstance(sampler, UniformSampler):
        return SamplingScheme.fixed_size(sampler.per_round, population, keep)
    if isinstance(sampler, PoissonSampler):
        if sampler.rate >= 1:
            return SamplingScheme.fixed_size(population, population, keep)
        return SamplingScheme("poisson", population, rate=sampler.rate, keep=keep)
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

    - The sampler and the clock's over-selection must draw and keep what ``scheme`` says
      (a Poisson sample is never thinned to its fastest clients: one client more could
      evict another).
    - Partial availability needs rounds of a fixed length (a deadline every round lasts)
      unless it is K of N, which it breaks anyway: otherwise how long a round lasts, and so
      who is online later, depends on who took part.
    - K of N needs every client online all the time: drawn from the ~M online clients, an
      online client is summed with probability K/M, not K/N.
    - Poisson sampling and full participation (add or remove one client) refuse stragglers:
      their share is drawn over the round's clients, so one client more changes who else
      does partial work or is dropped.
    """
    keep = (clock.keep or 0) if clock is not None else 0
    try:
        drawn = sampler_scheme(sampler, population, keep)
    except ConfigError as exc:
        return str(exc)
    if drawn is None:
        return (
            f"central DP accounts amplification by sampling for UniformSampler and "
            f"PoissonSampler only, not {type(sampler).__name__}"
        )
    if drawn != scheme:
        return (
            f"central DP is accounted for {scheme.describe()}, but the sampler draws "
            f"{drawn.describe()}"
            + (" (build the scheme with the clock's keep)" if drawn.keep != scheme.keep else "")
        )
    partial = clock is not None and not clock.devices.always_online
    if scheme.kind == "fixed" and partial:
        return (
            "central DP with K of N clients cannot run with partial availability: K drawn "
            "from the clients online at the time are each summed far more often than K/N; "
            "use Poisson sampling with fixed-length rounds (a deadline)"
        )
    who = "Poisson sampling" if scheme.kind == "poisson" else "full participation"
    if scheme.kind != "fixed":
        if partial and not (clock is not None and clock.fixed_rounds):
            return (
                f"central DP with {who} among the online clients needs rounds of a fixed "
                "length (a deadline every round lasts): otherwise who is online in a later "
                "round depends on who took part in an earlier one"
            )
        if stragglers is not None and stragglers.fraction > 0:
            return (
                f"central DP with {who} cannot simulate stragglers: their number is a share "
                "of the round's clients, so one client's presence changes who else does "
                "partial work or is dropped"
            )
    return None
