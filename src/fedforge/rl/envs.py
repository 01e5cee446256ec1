"""The environments an RL agent can hold: their torch dynamics and how to give a gymnasium env
the same physical parameters.

A :class:`BatchEnv` is data plus pure functions: ``reset(seeds)`` draws initial states exactly
as gymnasium's ``reset(seed=s)`` does (gymnasium seeds ``numpy.random.default_rng(s)`` and draws
``uniform(low, high, size=4)``), ``observe_reset`` and ``observe`` map initial and later
states to float32 observations and ``step`` advances a batch of states under per-row
physical parameters. Nothing here resets on its
own: what happens when an episode ends is the collector's business (see
:mod:`fedforge.rl.collect`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fedforge.rl import acrobot, cartpole

StepFn = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor]
]


@dataclass(frozen=True)
class BatchEnv:
    """One environment family: sizes, physical parameters and its batched dynamics."""

    env_id: str
    obs_dim: int
    num_actions: int
    parameters: tuple[str, ...]
    defaults: tuple[float, ...]
    reset_states: Callable[[list[int]], torch.Tensor]
    observe_reset: Callable[[torch.Tensor], torch.Tensor]
    observe: Callable[[torch.Tensor], torch.Tensor]
    step: StepFn
    gym_attributes: tuple[str, ...]

    def default_physics(self) -> torch.Tensor:
        """gymnasium's own parameters as one (P,) float64 row."""
        return torch.tensor(self.defaults, dtype=torch.float64)


CARTPOLE = BatchEnv(
    env_id="CartPole-v1",
    obs_dim=4,
    num_actions=2,
    parameters=cartpole.PARAMETERS,
    defaults=cartpole.DEFAULTS,
    reset_states=cartpole.reset,
    observe_reset=cartpole.observe,
    observe=cartpole.observe,
    step=cartpole.step,
    gym_attributes=cartpole.PARAMETERS,
)

ACROBOT = BatchEnv(
    env_id="Acrobot-v1",
    obs_dim=6,
    num_actions=3,
    parameters=acrobot.PARAMETERS,
    defaults=acrobot.DEFAULTS,
    reset_states=acrobot.reset,
    observe_reset=acrobot.observe_reset,
    observe=acrobot.observe,
    step=acrobot.step,
    gym_attributes=(
        "LINK_LENGTH_1",
        "LINK_MASS_1",
        "LINK_MASS_2",
        "LINK_COM_POS_1",
        "LINK_COM_POS_2",
        "LINK_MOI",
    ),
)

ENVIRONMENTS: dict[str, BatchEnv] = {env.env_id: env for env in (CARTPOLE, ACROBOT)}


def batch_env(env_id: str) -> BatchEnv:
    """The torch dynamics of ``env_id``; an unknown id is refused with the known ones."""
    try:
        return ENVIRONMENTS[env_id]
    except KeyError:
        known = ", ".join(ENVIRONMENTS)
        raise ValueError(f"unknown RL environment {env_id!r}; choose one of {known}") from None


def configure_gym_env(env: BatchEnv, gym_env: Any, physics: Sequence[float]) -> None:
    """Give a gymnasium env (wrapped or not) the physical parameters of one row of
    ``physics``, including the quantities gymnasium derives from them in ``__init__``."""
    if len(physics) != len(env.parameters):
        raise ValueError(
            f"{env.env_id} takes {len(env.parameters)} physical parameters "
            f"{env.parameters}, got {len(physics)}"
        )
    inner = gym_env.unwrapped
    for attribute, value in zip(env.gym_attributes, physics, strict=True):
        setattr(inner, attribute, float(value))
    if env is CARTPOLE:
        inner.total_mass = inner.masspole + inner.masscart
        inner.polemass_length = inner.masspole * inner.length
