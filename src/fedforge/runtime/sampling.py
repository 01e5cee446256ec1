"""Client sampling for a round."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedforge.core.errors import ConfigError


def sample_clients(
    population: Sequence[int], per_round: int, rng: np.random.Generator
) -> list[int]:
    """``per_round`` distinct ids drawn uniformly from ``population``, in ascending order."""
    if not 1 <= per_round <= len(population):
        raise ConfigError(
            f"clients_per_round must be in [1, {len(population)}] (the clients available), "
            f"got {per_round}"
        )
    chosen = rng.choice(len(population), size=per_round, replace=False)
    return sorted(int(population[i]) for i in chosen)
