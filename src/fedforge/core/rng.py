"""Explicit, order-independent random streams.

Every random decision draws from a stream named by its purpose and coordinates (round,
client). A stream depends only on the run seed and those coordinates, never on what ran
before it, so sequential, vectorized, multi-process and networked runtimes draw the same
numbers and a resumed run continues exactly where it stopped.

Per-client values that a round needs for every client (task seeds, batch orders) come from
SplitMix64 (Steele et al. 2014) evaluated as array operations, so a runtime derives them for a
whole cohort at once instead of building a generator per client; a client alone computes its
own with the same functions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # SplitMix64's increment
_MASK64 = (1 << 64) - 1


def mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer on uint64 arrays: a bijection with full avalanche."""
    z = np.asarray(z, np.uint64)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    out: np.ndarray = z ^ (z >> np.uint64(31))
    return out


def mix64_int(z: int) -> int:
    """:func:`mix64` of one Python integer (below 2**64)."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def seed_words(seeds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """The low and high 64-bit words of 128-bit seeds, as uint64 arrays."""
    ints = [int(s) for s in seeds]
    lo = np.array([s & _MASK64 for s in ints], np.uint64)
    hi = np.array([(s >> 64) & _MASK64 for s in ints], np.uint64)
    return lo, hi


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
        """The 128-bit seed of a client's random stream in a round (batch order, dropout,
        codecs).

        Tasks carry it to the client in every runtime, the network included, so a client
        draws the same numbers wherever it runs."""
        return self.task_seeds(round_number, [client_id])[0]

    def task_seeds(self, round_number: int, client_ids: Sequence[int]) -> list[int]:
        """:meth:`task_seed` of every client in ``client_ids``, computed as arrays: the
        round's key (from the run seed) mixed with each client id by SplitMix64."""
        key = self.seed_sequence(Purpose.CLIENT, round_number).generate_state(4, np.uint64)
        ids = np.asarray(client_ids, np.uint64)
        lo = mix64(key[0] ^ mix64(ids ^ key[1]))
        hi = mix64(key[2] ^ mix64(ids ^ key[3]))
        return [int(a) | int(b) << 64 for a, b in zip(lo.tolist(), hi.tolist(), strict=True)]

    def int_seed(self, purpose: Purpose, *coords: int) -> int:
        """A 63-bit integer seed, for libraries that take one (e.g. ``torch.manual_seed``)."""
        state = self.seed_sequence(purpose, *coords).generate_state(2, dtype=np.uint32)
        return (int(state[0]) << 31) ^ int(state[1])
