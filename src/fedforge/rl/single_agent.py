"""The plain baseline: one agent learning alone on gymnasium, no federation.

REINFORCE or GPOMDP on gymnasium's own env (``collect_gym``), one Adam optimizer (maximizing)
kept for the whole run, ``episodes`` trajectories per step until ``max_trajectories``. It is
the benchmark's K = 1 reference and what "a plain gymnasium loop" costs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from fedforge.rl.envs import BatchEnv
from fedforge.rl.estimators import Estimator, stacked_policy_gradient
from fedforge.rl.gym_collect import collect_gym
from fedforge.rl.policy import Policy, Tensors, mlp


@dataclass(frozen=True)
class SingleAgentRun:
    """The final policy and, after every step, (trajectories so far, mean return)."""

    params: Tensors
    history: list[tuple[int, float]]


def train_single_agent(
    env: BatchEnv,
    estimator: Estimator,
    episodes: int,
    horizon: int,
    lr: float,
    max_trajectories: int,
    seed: int,
    physics: torch.Tensor | None = None,
    hidden: tuple[int, ...] = (16, 16),
) -> SingleAgentRun:
    """Train one policy from ``seed`` on gymnasium with the given (or default) physics."""
    policy = Policy(mlp(env.obs_dim, env.num_actions, hidden))
    row = (physics if physics is not None else env.default_physics()).reshape(1, -1)
    leaves = {name: t.unsqueeze(0).requires_grad_(True) for name, t in policy.init(seed).items()}
    opt = torch.optim.Adam(list(leaves.values()), lr=lr, maximize=True)
    history: list[tuple[int, float]] = []
    used = 0
    step = 0
    while used < max_trajectories:
        current = {name: t.detach() for name, t in leaves.items()}
        stream = np.random.SeedSequence(entropy=seed, spawn_key=(step,))
        traj = collect_gym(env, policy, current, row, [stream], episodes, horizon)
        grads = stacked_policy_gradient(policy, current, traj, estimator)
        for name, leaf in leaves.items():
            leaf.grad = grads[name]
        opt.step()
        used += episodes
        step += 1
        history.append((used, float(traj.returns.mean())))
    return SingleAgentRun({name: t.detach()[0] for name, t in leaves.items()}, history)
