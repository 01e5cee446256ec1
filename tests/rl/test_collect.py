"""The vectorized collector gives the gymnasium collector's trajectories for the same seeds,
and an agent's episodes do not depend on the other agents in the batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedforge.rl.collect import collect
from fedforge.rl.envs import ACROBOT, CARTPOLE, BatchEnv
from fedforge.rl.physics import EnvSpec, agent_physics
from fedforge.rl.policy import Policy, mlp, stack

pytest.importorskip("gymnasium")
from fedforge.rl.gym_collect import collect_gym

SPREADS = {
    "CartPole-v1": {"length": (0.35, 0.65), "masspole": (0.05, 0.2), "force_mag": (8.0, 12.0)},
    "Acrobot-v1": {"link_mass_2": (0.7, 1.3), "link_length_1": (0.8, 1.2)},
}


def _agents(env: BatchEnv, count: int, seed: int = 0):
    policy = Policy(mlp(env.obs_dim, env.num_actions))
    params = stack([policy.init(seed + k) for k in range(count)])
    physics = agent_physics(EnvSpec(env_id=env.env_id, spread=SPREADS[env.env_id]), range(count), 3)
    return policy, params, physics


def _assert_same(a, b) -> None:
    assert torch.equal(a.alive, b.alive)
    assert torch.equal(a.actions, b.actions)
    assert torch.equal(a.rewards, b.rewards)
    assert torch.equal(a.terminated, b.terminated)
    assert torch.equal(a.truncated, b.truncated)
    assert torch.equal(a.obs, b.obs)


def test_cartpole_collectors_agree_bit_for_bit() -> None:
    policy, params, physics = _agents(CARTPOLE, 5)
    seeds = [11, 12, 13, 14, 15]
    faulty = torch.tensor([False, False, True, False, False])
    fast = collect(CARTPOLE, policy, params, physics, seeds, 4, 500, random_actions=faulty)
    slow = collect_gym(CARTPOLE, policy, params, physics, seeds, 4, 500, random_actions=faulty)
    _assert_same(fast, slow)
    assert bool(fast.terminated.all()) and fast.lengths.max() > 20


def test_acrobot_collectors_agree_bit_for_bit_and_truncate_at_the_horizon() -> None:
    """Acrobot is chaotic: a single last-bit difference would grow into a different
    trajectory long before 300 steps."""
    policy, params, physics = _agents(ACROBOT, 3)
    seeds = [np.random.SeedSequence(7, spawn_key=(k,)) for k in range(3)]
    fast = collect(ACROBOT, policy, params, physics, seeds, 2, 300)
    slow = collect_gym(ACROBOT, policy, params, physics, seeds, 2, 300)
    _assert_same(fast, slow)
    assert bool(fast.truncated.all()) and fast.obs.shape[2] == 300
    assert torch.equal(fast.returns, torch.full((3, 2), -300.0, dtype=torch.float64))


def test_greedy_evaluation_agrees() -> None:
    policy, params, physics = _agents(CARTPOLE, 2, seed=5)
    fast = collect(CARTPOLE, policy, params, physics, [1, 2], 3, 60, greedy=True)
    slow = collect_gym(CARTPOLE, policy, params, physics, [1, 2], 3, 60, greedy=True)
    _assert_same(fast, slow)
    with torch.no_grad():
        best = torch.stack(
            [policy.logits({n: t[k] for n, t in params.items()}, fast.obs[k]) for k in range(2)]
        )
    assert torch.equal(fast.actions[fast.alive], best.argmax(-1)[fast.alive])


def test_an_agents_episodes_do_not_depend_on_the_batch() -> None:
    policy, params, physics = _agents(CARTPOLE, 6)
    seeds = list(range(100, 106))
    together = collect(CARTPOLE, policy, params, physics, seeds, 3, 500)
    alone = collect(
        CARTPOLE, policy, {n: t[4:5] for n, t in params.items()}, physics[4:5], seeds[4:5], 3, 500
    )
    steps = alone.obs.shape[2]
    assert torch.equal(together.actions[4, :, :steps], alone.actions[0])
    assert torch.equal(together.obs[4, :, :steps], alone.obs[0])
    assert not together.alive[4, :, steps:].any()


def test_episodes_end_once_and_pad_with_zeros() -> None:
    policy, params, physics = _agents(CARTPOLE, 2)
    traj = collect(CARTPOLE, policy, params, physics, [3, 4], 5, 500)
    lengths = traj.lengths
    for k in range(2):
        for e in range(5):
            n = int(lengths[k, e])
            assert traj.alive[k, e, :n].all() and not traj.alive[k, e, n:].any()
            assert traj.rewards[k, e, n:].abs().sum() == 0 and traj.obs[k, e, n:].abs().sum() == 0
    torch.testing.assert_close(traj.returns, lengths.to(torch.float64))  # CartPole: 1 per step


def test_mismatched_sizes_are_refused() -> None:
    policy, params, physics = _agents(CARTPOLE, 2)
    with pytest.raises(ValueError, match=r"physics must be \(agents, 5\)"):
        collect(CARTPOLE, policy, params, physics, [1, 2, 3], 1, 10)
    with pytest.raises(ValueError, match="episodes >= 1"):
        collect(CARTPOLE, policy, params, physics, [1, 2], 0, 10)
