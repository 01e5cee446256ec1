"""A batch of episodes, and the random numbers that decide them.

Every agent's randomness comes from its own seed (in a federated round: the task seed the
runtime hands the client), through :func:`agent_draws`: one gymnasium reset seed per episode
and one uniform per (episode, step) for the action. Both collectors consume exactly these
numbers, which is why the same seeds give the same trajectories in the vectorized collector
and on gymnasium itself, and why an agent's episodes do not depend on how many agents share
the tensor program.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SEED_BOUND = 2**63 - 1
Seed = int | np.random.SeedSequence  # an agent's stream: numpy.random.default_rng(seed)


@dataclass(frozen=True)
class AgentDraws:
    """An agent's random numbers for one collection: ``episode_seeds`` (E,) for gymnasium's
    ``reset(seed=...)`` and ``uniforms`` (E, H) float32 for the actions."""

    episode_seeds: list[int]
    uniforms: np.ndarray


def agent_draws(seed: Seed, episodes: int, horizon: int) -> AgentDraws:
    """The draws of an agent whose stream is ``numpy.random.default_rng(seed)``."""
    if episodes < 1 or horizon < 1:
        raise ValueError(f"need episodes >= 1 and horizon >= 1, got {episodes}, {horizon}")
    rng = np.random.default_rng(seed)
    seeds = [int(s) for s in rng.integers(0, SEED_BOUND, size=episodes)]
    return AgentDraws(seeds, rng.random((episodes, horizon), dtype=np.float32))


@dataclass(frozen=True)
class Trajectories:
    """Episodes of A agents, E each, padded to T steps (the longest episode).

    ``obs`` (A, E, T, obs_dim) float32 is the observation each action was taken on;
    ``actions`` (A, E, T) int64; ``rewards`` (A, E, T) float32, zero past an episode's end;
    ``alive`` (A, E, T) bool marks the steps that belong to the episode; ``terminated`` and
    ``truncated`` (A, E) say how each episode ended (truncated: it lasted the whole horizon,
    as gymnasium's ``TimeLimit`` reports it, so a last allowed step that terminates is both)."""

    obs: torch.Tensor
    actions: torch.Tensor
    rewards: torch.Tensor
    alive: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor

    @property
    def num_agents(self) -> int:
        return int(self.actions.shape[0])

    @property
    def episodes(self) -> int:
        return int(self.actions.shape[1])

    @property
    def lengths(self) -> torch.Tensor:
        """Steps per episode (A, E)."""
        return self.alive.sum(dim=-1)

    @property
    def returns(self) -> torch.Tensor:
        """Undiscounted return of every episode (A, E) float64."""
        return self.rewards.to(torch.float64).sum(dim=-1)

    def agent(self, k: int) -> Trajectories:
        """Agent ``k``'s episodes, keeping a leading agent axis of size 1."""
        return Trajectories(
            self.obs[k : k + 1],
            self.actions[k : k + 1],
            self.rewards[k : k + 1],
            self.alive[k : k + 1],
            self.terminated[k : k + 1],
            self.truncated[k : k + 1],
        )
