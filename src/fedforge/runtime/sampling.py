"""Client samplers: who takes part in a round.

A sampler is any callable ``(population, rng) -> client ids``; the driver hands it the ids
that may be sampled now (all clients in simulation, the connected ones in deployment) and the
round's seeded generator. Differential privacy accounts by the sampler's scheme.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from fedforge.core.errors import ConfigError


class Sampler(Protocol):
    def __call__(self, population: Sequence[int], rng: np.random.Generator) -> list[int]: ...


@dataclass(frozen=True)
class UniformSampler:
    """``per_round`` distinct clients uniformly without replacement (fewer when fewer are
    available), in ascending order."""

    per_round: int

    def __post_init__(self) -> None:
        if self.per_round < 1:
            raise ConfigError(f"clients_per_round must be >= 1, got {self.per_round}")

    def __call__(self, population: Sequence[int], rng: np.random.Generator) -> list[int]:
        k = min(self.per_round, len(population))
        chosen = rng.choice(len(population), size=k, replace=False)
        return sorted(int(population[i]) for i in chosen)


@dataclass(frozen=True)
class PoissonSampler:
    """Each client independently with probability ``rate`` (the cohort size varies)."""

    rate: float

    def __post_init__(self) -> None:
        if not 0 < self.rate <= 1:
            raise ConfigError(f"sampling rate must be in (0, 1], got {self.rate}")

    def __call__(self, population: Sequence[int], rng: np.random.Generator) -> list[int]:
        keep = rng.random(len(population)) < self.rate
        return sorted(int(population[int(i)]) for i in np.flatnonzero(keep))
