"""Explicit, order-independent random streams.

Every random decision draws from a stream named by its purpose and coordinates (round,
client). A stream depends only on the run seed and those coordinates, never on what ran
before it, so sequential, vectorized, multi-process and networked runtimes draw the same
numbers and a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

import numpy as np


class Purpose(IntEnum):
    """What a stream is used for; part of its identity."""

    INIT = 0
    PARTITION = 1
    SAMPLING = 2
    CLIENT = 3
    EVALUATION = 4
    STRAGGLERS = 5
    DEVICES = 12  # simulated device speeds, bandwidths and availability
    ENVIRONMENT = 13  # RL agents' physical parameters and the held-out evaluation set


@dataclass(frozen=True)
class RngStreams:
    """Factory of independent generators keyed by (purpose, *coordinates)."""

    seed: int

    def generator(self, purpose: Purpose, *coords: int) -> np.random.Generator:
        return np.random.default_rng(self.seed_sequence(purpose, *coords))

    def seed_sequence(self, purpose: Purpose, *coords: int) -> np.random.SeedSequence:
        return np.random.SeedSequence(entropy=self.seed, spawn_key=(int(purpose), *coords))

    def task_seed(self, round_number: int, client_id: int) -> int:
        """The 128-bit seed of a client's random stream in a round (batch order, dropout).

        Tasks carry it to the client in every runtime, the network included, so a client
        draws the same numbers wherever it runs."""
        words = self.seed_sequence(Purpose.CLIENT, round_number, client_id).generate_state(4)
        return int.from_bytes(words.astype("<u4").tobytes(), "little")

    def int_seed(self, purpose: Purpose, *coords: int) -> int:
        """A 63-bit integer seed, for libraries that take one (e.g. ``torch.manual_seed``)."""
        state = self.seed_sequence(purpose, *coords).generate_state(2, dtype=np.uint32)
        return (int(state[0]) << 31) ^ int(state[1])
