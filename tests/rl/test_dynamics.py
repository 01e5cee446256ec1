"""The torch dynamics equal gymnasium's own ``step`` (observation, reward, terminated,
truncated) bit for bit on the same states and actions, over random states, trajectories and
physical parameters."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedforge.rl.envs import ACROBOT, CARTPOLE, BatchEnv, batch_env, configure_gym_env

gymnasium = pytest.importorskip("gymnasium")

ENVS = [CARTPOLE, ACROBOT]


def _random_physics(env: BatchEnv, rng: np.random.Generator) -> list[float]:
    return [d * float(rng.uniform(0.6, 1.4)) for d in env.defaults]


@pytest.mark.parametrize("env", ENVS, ids=lambda e: e.env_id)
def test_reset_matches_gymnasium(env: BatchEnv) -> None:
    gym_env = gymnasium.make(env.env_id)
    seeds = [*range(3000), 2**62 + 7]
    states = env.reset_states(seeds)
    for seed, state in zip(seeds, states, strict=True):
        obs, _ = gym_env.reset(seed=seed)
        np.testing.assert_array_equal(env.observe_reset(state).numpy(), obs)
        np.testing.assert_array_equal(state.numpy(), np.asarray(gym_env.unwrapped.state))


def _random_states(env: BatchEnv, rng: np.random.Generator, n: int) -> np.ndarray:
    """States across (and beyond) the region episodes visit, terminal ones included."""
    if env is CARTPOLE:
        high = np.array([2.6, 3.0, 0.25, 3.5])
    else:  # angles anywhere, velocities up to and past the clip bounds
        high = np.array([np.pi, np.pi, 4.5 * np.pi, 10 * np.pi])
    return rng.uniform(-high, high, size=(n, 4))


@pytest.mark.parametrize("env", ENVS, ids=lambda e: e.env_id)
def test_one_step_from_random_states_matches(env: BatchEnv) -> None:
    """One batched torch step from 400 random (state, physics, action) triples equals 400
    gymnasium steps from the same states."""
    rng = np.random.default_rng(1)
    n = 400
    states = _random_states(env, rng, n)
    physics = [_random_physics(env, rng) for _ in range(n)]
    actions = rng.integers(env.num_actions, size=n)
    next_state, reward, terminated = env.step(
        torch.from_numpy(states),
        torch.from_numpy(actions),
        torch.tensor(physics, dtype=torch.float64),
    )
    gym_env = gymnasium.make(env.env_id)
    gym_env.reset(seed=0)
    inner = gym_env.unwrapped
    for k in range(n):
        configure_gym_env(env, gym_env, physics[k])
        inner.state = states[k].copy()
        inner.steps_beyond_terminated = None  # CartPole: a fresh, not a finished, episode
        obs, gym_reward, gym_terminated, _, _ = inner.step(int(actions[k]))
        np.testing.assert_allclose(next_state[k].numpy(), np.asarray(inner.state), rtol=0, atol=0)
        np.testing.assert_allclose(env.observe(next_state[k]).numpy(), obs, rtol=0, atol=0)
        assert float(reward[k]) == gym_reward
        assert bool(terminated[k]) == gym_terminated
    assert 0 < int(terminated.sum()) < n  # both outcomes were exercised


@pytest.mark.parametrize("env", ENVS, ids=lambda e: e.env_id)
def test_free_running_batch_matches_gymnasium(env: BatchEnv) -> None:
    """Many episodes in one batch (own physics each), run from reset without resyncing."""
    rng = np.random.default_rng(2)
    episodes, horizon = 12, 500
    physics = [_random_physics(env, rng) for _ in range(episodes)]
    seeds = [int(s) for s in rng.integers(2**31, size=episodes)]
    actions = rng.integers(env.num_actions, size=(episodes, horizon))
    state = env.reset_states(seeds)
    rows = torch.tensor(physics, dtype=torch.float64)
    torch_obs, torch_rew, torch_term = [], [], []
    for t in range(horizon):
        state, rew, term = env.step(state, torch.from_numpy(actions[:, t]), rows)
        torch_obs.append(env.observe(state))
        torch_rew.append(rew)
        torch_term.append(term)
    gym_env = gymnasium.make(env.env_id, max_episode_steps=horizon)
    for e in range(episodes):
        configure_gym_env(env, gym_env, physics[e])
        gym_env.reset(seed=seeds[e])
        for t in range(horizon):
            obs, reward, terminated, truncated, _ = gym_env.step(int(actions[e, t]))
            np.testing.assert_array_equal(torch_obs[t][e].numpy(), obs)
            assert float(torch_rew[t][e]) == reward
            assert bool(torch_term[t][e]) == terminated
            assert truncated == (t + 1 == horizon)
            if terminated or truncated:
                break


def test_cartpole_is_bit_exact_and_physics_matter() -> None:
    """CartPole's arithmetic is gymnasium's to the bit; a heavier pole changes the motion."""
    gym_env = gymnasium.make("CartPole-v1")
    physics = [9.81, 0.7, 0.3, 0.62, 12.0]
    configure_gym_env(CARTPOLE, gym_env, physics)
    gym_env.reset(seed=5)
    state = CARTPOLE.reset_states([5])
    row = torch.tensor([physics], dtype=torch.float64)
    default = CARTPOLE.default_physics()[None]
    other = state.clone()
    for t in range(8):
        gym_env.step(t % 2)
        state, _, _ = CARTPOLE.step(state, torch.tensor([t % 2]), row)
        other, _, _ = CARTPOLE.step(other, torch.tensor([t % 2]), default)
        np.testing.assert_array_equal(state[0].numpy(), np.asarray(gym_env.unwrapped.state))
    assert not torch.equal(state, other)


def test_unknown_environment_and_bad_physics_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown RL environment 'Pong-v5'"):
        batch_env("Pong-v5")
    with pytest.raises(ValueError, match="takes 5 physical parameters"):
        configure_gym_env(CARTPOLE, gymnasium.make("CartPole-v1"), [1.0])
