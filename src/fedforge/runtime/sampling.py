"""Client sampling for a round."""

from __future__ import annotations

import numpy as np

from fedforge.core.errors import ConfigError


def sample_clients(num_clients: int, per_round: int, rng: np.random.Generator) -> list[int]:
    """``per_round`` distinct client ids drawn uniformly, returned in ascending order."""
    if not 1 <= per_round <= num_clients:
        raise ConfigError(
            f"clients_per_round must be in [1, {num_clients}] (the number of clients), "
            f"got {per_round}"
        )
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))
