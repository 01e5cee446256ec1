"""The vectorized collector: every agent's episodes as one tensor program.

All (agent, episode) pairs step together: a state tensor (A, E, S) in float64, the agents'
physical parameters broadcast over their episodes, the agents' policies vmapped over the agent
axis. A step costs a few dozen tensor operations whatever A and E are, so a hundred agents do
not cost a hundred times one.

Episode semantics (no autoreset): each (agent, episode) slot holds exactly one episode, from
gymnasium's ``reset(seed=s)`` state to its end. When an episode terminates, or reaches the
horizon (truncation, gymnasium's ``TimeLimit``), its slot stops: its state is frozen, later
steps are not ``alive`` and earn no reward, and no new episode starts in it (unlike
gymnasium's vector envs, which autoreset on the next step). Past its end an episode's padded
steps hold zeros (observation, action, reward), as the gymnasium collector pads them. The
loop ends when every slot has stopped, so the batch is as long as its longest episode.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from fedforge.rl.envs import BatchEnv
from fedforge.rl.policy import Policy, Tensors, sample_actions, uniform_actions
from fedforge.rl.trajectories import Seed, Trajectories, agent_draws


def check_request(
    env: BatchEnv, physics: torch.Tensor, seeds: Sequence[Seed], episodes: int, horizon: int
) -> None:
    """Refuse a collection whose sizes do not fit together."""
    if physics.shape != (len(seeds), len(env.parameters)):
        raise ValueError(
            f"physics must be (agents, {len(env.parameters)}) = ({len(seeds)}, "
            f"{len(env.parameters)}) for {env.env_id}, got {tuple(physics.shape)}"
        )
    if episodes < 1 or horizon < 1:
        raise ValueError(f"need episodes >= 1 and horizon >= 1, got {episodes}, {horizon}")


@torch.no_grad()
def collect(
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
    """``episodes`` episodes of each of ``len(seeds)`` agents, truncated at ``horizon`` steps.

    ``params`` is the agents' stacked policy parameters (agent axis first), ``physics`` their
    physical parameters (A, P) float64, ``seeds`` their random streams (see
    :func:`~fedforge.rl.trajectories.agent_draws`). Agents flagged in ``random_actions`` (A,)
    act uniformly at random instead of following their policy; ``greedy`` takes every
    policy's most probable action instead of sampling (evaluation). Everything runs on the
    device of ``params``."""
    check_request(env, physics, seeds, episodes, horizon)
    agents = len(seeds)
    draws = [agent_draws(s, episodes, horizon) for s in seeds]
    reset_seeds = [s for d in draws for s in d.episode_seeds]
    device = next(iter(params.values())).device
    state = env.reset_states(reset_seeds).reshape(agents, episodes, -1).to(device)
    uniforms = torch.from_numpy(np.stack([d.uniforms for d in draws])).to(device)
    row_physics = physics.to(device, torch.float64).unsqueeze(1)
    if random_actions is not None:
        random_actions = random_actions.to(device)

    size = (agents, episodes, horizon)
    obs_buf = torch.zeros(*size, env.obs_dim, device=device)
    act_buf = torch.zeros(size, dtype=torch.long, device=device)
    rew_buf = torch.zeros(size, device=device)
    alive_buf = torch.zeros(size, dtype=torch.bool, device=device)
    alive = torch.ones(agents, episodes, dtype=torch.bool, device=device)
    terminated = torch.zeros(agents, episodes, dtype=torch.bool, device=device)
    obs = env.observe_reset(state)
    steps = horizon
    for t in range(horizon):
        logits = policy.stacked_logits(params, obs)
        actions = logits.argmax(-1) if greedy else sample_actions(logits, uniforms[:, :, t])
        if random_actions is not None:
            chosen = uniform_actions(uniforms[:, :, t], env.num_actions)
            actions = torch.where(random_actions.unsqueeze(1), chosen, actions)
        obs_buf[:, :, t] = torch.where(alive.unsqueeze(-1), obs, 0.0)
        act_buf[:, :, t] = torch.where(alive, actions, 0)
        alive_buf[:, :, t] = alive
        next_state, reward, ended = env.step(state, actions, row_physics)
        rew_buf[:, :, t] = torch.where(alive, reward, 0.0)
        terminated |= alive & ended
        alive = alive & ~ended
        state = torch.where(alive.unsqueeze(-1), next_state, state)
        obs = env.observe(state)
        if not bool(alive.any()):
            steps = t + 1
            break
    return Trajectories(
        obs=obs_buf[:, :, :steps],
        actions=act_buf[:, :, :steps],
        rewards=rew_buf[:, :, :steps],
        alive=alive_buf[:, :, :steps],
        terminated=terminated,
        truncated=alive_buf.sum(dim=-1) == horizon,
    )
