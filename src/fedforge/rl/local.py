"""An agent's work in a round, for any number of agents at once (stacked, vmapped).

- :func:`estimate_gradients` (FedPG, FedPG-BR): collect ``episodes`` trajectories with the
  global policy and report the policy-gradient estimate at it.
- :func:`local_update` (FedAvg of policies, FedKL / proximal variants): ``iterations`` times,
  collect with the current local policy and take an ascent step along
  :func:`penalized_gradient` (the estimate minus the penalties toward the global policy);
  report the new local policy. The optimizer's state lives for one local update.

Both take a ``collector``: :func:`fedforge.rl.collect.collect` (vectorized, the default) or
:func:`fedforge.rl.gym_collect.collect_gym` (gymnasium itself, one agent at a time); the
math after collection is the same code. Iteration ``i`` of an agent whose round seed is ``s``
draws from ``SeedSequence(s, spawn_key=(i,))``; ``evaluate`` rows draw from their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, cast

import numpy as np
import torch
from torch.func import grad, vmap

from fedforge.rl.collect import collect
from fedforge.rl.envs import BatchEnv
from fedforge.rl.estimators import Estimator, stacked_policy_gradient, step_weights, surrogate
from fedforge.rl.penalty import kl_to_global, proximal_to_global
from fedforge.rl.policy import Policy, Tensors
from fedforge.rl.trajectories import Seed, Trajectories


class Collector(Protocol):
    def __call__(
        self,
        env: BatchEnv,
        policy: Policy,
        params: Tensors,
        physics: torch.Tensor,
        seeds: Sequence[Seed],
        episodes: int,
        horizon: int,
        random_actions: torch.Tensor | None = None,
        greedy: bool = False,
    ) -> Trajectories: ...


@dataclass(frozen=True)
class LocalRL:
    """An agent's local policy-gradient work: ``iterations`` steps of ``episodes`` episodes
    each, truncated at ``horizon``; ``kl`` (beta) and ``prox`` (mu) weigh the penalties
    toward the global policy; ``optimizer`` is torch's SGD or Adam, maximizing."""

    estimator: Estimator = field(default_factory=Estimator)
    episodes: int = 10
    horizon: int = 500
    iterations: int = 1
    lr: float = 1e-2
    optimizer: Literal["sgd", "adam"] = "adam"
    kl: float = 0.0
    prox: float = 0.0

    def __post_init__(self) -> None:
        if min(self.episodes, self.horizon, self.iterations) < 1:
            raise ValueError("episodes, horizon and iterations must be >= 1")
        if not self.lr > 0 or self.kl < 0 or self.prox < 0:
            raise ValueError(
                f"need lr > 0, kl >= 0, prox >= 0; got {self.lr}, {self.kl}, {self.prox}"
            )
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")


@dataclass(frozen=True)
class LocalResult:
    """The agents' new stacked parameters, the mean undiscounted return (A,) of the episodes
    they collected, and the trajectories each agent used."""

    params: Tensors
    mean_return: torch.Tensor
    trajectories: int


def iteration_seed(seed: int, iteration: int) -> np.random.SeedSequence:
    """The stream of an agent's ``iteration``-th collection in a round whose seed is ``seed``."""
    return np.random.SeedSequence(entropy=seed, spawn_key=(iteration,))


def estimate_gradients(
    env: BatchEnv,
    policy: Policy,
    params: Tensors,
    physics: torch.Tensor,
    seeds: Sequence[Seed],
    episodes: int,
    horizon: int,
    estimator: Estimator,
    random_actions: torch.Tensor | None = None,
    collector: Collector = collect,
) -> tuple[Tensors, Trajectories]:
    """Every agent's gradient estimate at its (stacked) ``params``, and the trajectories."""
    traj = collector(env, policy, params, physics, seeds, episodes, horizon, random_actions)
    return stacked_policy_gradient(policy, params, traj, estimator), traj


def _objective(
    policy: Policy,
    params: Tensors,
    global_params: Tensors,
    obs: torch.Tensor,
    actions: torch.Tensor,
    weights: torch.Tensor,
    alive: torch.Tensor,
    kl: float,
    prox: float,
) -> torch.Tensor:
    """One agent's local objective: the surrogate minus the penalties toward the global."""
    value = surrogate(policy, params, obs, actions, weights)
    if kl:
        value = value - kl * kl_to_global(policy, params, global_params, obs, alive)
    if prox:
        value = value - proximal_to_global(params, global_params, prox)
    return value


def penalized_gradient(
    policy: Policy,
    params: Tensors,
    global_params: Tensors,
    traj: Trajectories,
    estimator: Estimator,
    kl: float = 0.0,
    prox: float = 0.0,
) -> Tensors:
    """Every agent's ascent direction on its local objective: the policy-gradient estimate
    minus ``kl`` times the gradient of :func:`~fedforge.rl.penalty.kl_to_global` on its
    visited states, minus ``prox * (theta - theta_global)``. ``params`` stacked over agents,
    ``global_params`` one policy."""
    weights = step_weights(traj.rewards, traj.alive, estimator)
    gradient = vmap(grad(_objective, argnums=1), in_dims=(None, 0, None, 0, 0, 0, 0, None, None))
    return cast(
        Tensors,
        gradient(
            policy,
            params,
            global_params,
            traj.obs,
            traj.actions,
            weights,
            traj.alive,
            kl,
            prox,
        ),
    )


def local_update(
    cfg: LocalRL,
    env: BatchEnv,
    policy: Policy,
    params: Tensors,
    global_params: Tensors,
    physics: torch.Tensor,
    seeds: Sequence[int],
    random_actions: torch.Tensor | None = None,
    collector: Collector = collect,
) -> LocalResult:
    """``cfg.iterations`` penalized policy-gradient ascent steps of every agent from its
    (stacked) ``params``; ``global_params`` is the round's global policy (one, unstacked)."""
    local = {name: t.detach().clone().requires_grad_(True) for name, t in params.items()}
    leaves = list(local.values())
    opt = (
        torch.optim.Adam(leaves, lr=cfg.lr, maximize=True)
        if cfg.optimizer == "adam"
        else torch.optim.SGD(leaves, lr=cfg.lr, maximize=True)
    )
    returns = []
    for i in range(cfg.iterations):
        current = {name: t.detach() for name, t in local.items()}
        traj = collector(
            env,
            policy,
            current,
            physics,
            [iteration_seed(s, i) for s in seeds],
            cfg.episodes,
            cfg.horizon,
            random_actions,
        )
        g = penalized_gradient(
            policy, current, global_params, traj, cfg.estimator, cfg.kl, cfg.prox
        )
        for name, leaf in local.items():
            leaf.grad = g[name]
        opt.step()
        returns.append(traj.returns.mean(dim=-1))
    new = {name: t.detach() for name, t in local.items()}
    mean_return = torch.stack(returns).mean(dim=0)
    return LocalResult(new, mean_return, cfg.iterations * cfg.episodes)


def evaluate(
    env: BatchEnv,
    policy: Policy,
    params: Tensors,
    physics: torch.Tensor,
    episodes: int,
    horizon: int,
    seed: int,
    greedy: bool = True,
    collector: Collector = collect,
) -> torch.Tensor:
    """The mean undiscounted return (M,) of one policy on each of M physics rows (the
    agents' own, or the held-out set); row ``m`` draws from ``SeedSequence(seed, (m,))``."""
    rows = physics.shape[0]
    stacked = {name: t.expand(rows, *t.shape) for name, t in params.items()}
    seeds = [np.random.SeedSequence(entropy=seed, spawn_key=(m,)) for m in range(rows)]
    traj = collector(env, policy, stacked, physics, seeds, episodes, horizon, greedy=greedy)
    return traj.returns.mean(dim=-1)
