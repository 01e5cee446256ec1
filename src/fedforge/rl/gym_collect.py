"""The reference collector: the same episodes on gymnasium itself, one agent at a time.

For the sequential and worker runtimes, and as the oracle the vectorized collector is tested
against. It consumes the same random numbers (:func:`~fedforge.rl.trajectories.agent_draws`):
gymnasium's ``reset(seed=s)`` for every episode and one uniform per step for the action, and
gives its env the agent's physical parameters. gymnasium's ``TimeLimit`` truncates at the
horizon.

The trajectories are identical, bit for bit, on the CPU: the torch dynamics round as
gymnasium does (:mod:`fedforge.rl.libm`) and both collectors draw actions from the same
probabilities and uniforms. On a GPU, torch's own cos/sin differ in the last bit now and then
and Acrobot, being chaotic, turns that into a different (equally distributed) trajectory
within ~100 steps; CartPole stays within float rounding. gymnasium is imported here only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from fedforge.rl.collect import check_request
from fedforge.rl.envs import BatchEnv, configure_gym_env
from fedforge.rl.policy import Policy, Tensors, sample_actions, uniform_actions
from fedforge.rl.trajectories import Seed, Trajectories, agent_draws


def import_gymnasium() -> Any:
    """gymnasium, or one clear error saying how to install it."""
    try:
        import gymnasium
    except ImportError:
        raise ImportError(
            "the gymnasium collector needs gymnasium: pip install 'fedforge[rl]'"
        ) from None
    return gymnasium


def _episode(
    gym_env: object,
    policy: Policy,
    params: Tensors,
    reset_seed: int,
    uniforms: np.ndarray,
    num_actions: int,
    random_actions: bool,
    greedy: bool,
) -> tuple[list[np.ndarray], list[int], list[float], bool, bool]:
    """One episode on ``gym_env``: observations, actions, rewards, terminated, truncated."""
    obs, _ = gym_env.reset(seed=reset_seed)  # type: ignore[attr-defined]
    observations: list[np.ndarray] = []
    actions: list[int] = []
    rewards: list[float] = []
    for u in uniforms:
        u_t = torch.tensor(u)
        if random_actions:
            action = int(uniform_actions(u_t, num_actions))
        else:
            with torch.no_grad():
                logits = policy.logits(params, torch.from_numpy(obs))
            action = int(logits.argmax(-1) if greedy else sample_actions(logits, u_t))
        observations.append(obs)
        actions.append(action)
        obs, reward, terminated, truncated, _ = gym_env.step(action)  # type: ignore[attr-defined]
        rewards.append(float(reward))
        if terminated or truncated:
            return observations, actions, rewards, bool(terminated), bool(truncated)
    raise RuntimeError("the episode outlived gymnasium's TimeLimit")  # pragma: no cover


def collect_gym(
    env: BatchEnv,
    policy: Policy,
    params: Tensors,
    physics: torch.Tensor,
    seeds: Sequence[Seed],
    episodes: int,
    horizon: int,
    random_actions: torch.Tensor | None = None,
    greedy: bool = False,
) -> Trajectories:
    """Same contract as :func:`fedforge.rl.collect.collect`, stepping gymnasium envs."""
    gymnasium = import_gymnasium()
    check_request(env, physics, seeds, episodes, horizon)
    runs = []
    for k, seed in enumerate(seeds):
        gym_env = gymnasium.make(env.env_id, max_episode_steps=horizon)
        configure_gym_env(env, gym_env, physics[k].tolist())
        draws = agent_draws(seed, episodes, horizon)
        own = {name: t[k] for name, t in params.items()}
        is_random = bool(random_actions[k]) if random_actions is not None else False
        runs.append(
            [
                _episode(gym_env, policy, own, s, u, env.num_actions, is_random, greedy)
                for s, u in zip(draws.episode_seeds, draws.uniforms, strict=True)
            ]
        )
        gym_env.close()
    return _pad(runs, len(seeds), episodes, env.obs_dim)


def _pad(
    runs: list[list[tuple[list[np.ndarray], list[int], list[float], bool, bool]]],
    agents: int,
    episodes: int,
    obs_dim: int,
) -> Trajectories:
    """Pack ragged episodes into the padded :class:`Trajectories` layout."""
    steps = max(len(ep[1]) for run in runs for ep in run)
    obs = torch.zeros(agents, episodes, steps, obs_dim)
    actions = torch.zeros(agents, episodes, steps, dtype=torch.long)
    rewards = torch.zeros(agents, episodes, steps)
    alive = torch.zeros(agents, episodes, steps, dtype=torch.bool)
    terminated = torch.zeros(agents, episodes, dtype=torch.bool)
    truncated = torch.zeros(agents, episodes, dtype=torch.bool)
    for k, run in enumerate(runs):
        for e, (o, a, r, term, trunc) in enumerate(run):
            n = len(a)
            obs[k, e, :n] = torch.from_numpy(np.stack(o))
            actions[k, e, :n] = torch.tensor(a)
            rewards[k, e, :n] = torch.tensor(r)
            alive[k, e, :n] = True
            terminated[k, e], truncated[k, e] = term, trunc
    return Trajectories(obs, actions, rewards, alive, terminated, truncated)
