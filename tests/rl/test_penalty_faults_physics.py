"""The penalty toward the global policy, the faulty agents' transforms, the per-agent physics."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.func import grad

from fedforge.rl.collect import collect
from fedforge.rl.envs import CARTPOLE
from fedforge.rl.faults import faulty_reports, random_action_mask, random_noise
from fedforge.rl.penalty import kl_to_global, proximal_to_global
from fedforge.rl.physics import EnvSpec, agent_physics, heldout_physics
from fedforge.rl.policy import Policy, mlp, stack

# --- penalty -------------------------------------------------------------------------------


def _policy_and_states():
    policy = Policy(mlp(4, 2))
    theta_g = policy.init(0)
    obs = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
    alive = torch.arange(40) < 30
    direction = policy.init(1)
    return policy, theta_g, obs, alive, direction


def test_kl_is_zero_with_zero_gradient_at_the_global_policy() -> None:
    policy, theta_g, obs, alive, _ = _policy_and_states()
    assert float(kl_to_global(policy, theta_g, theta_g, obs, alive)) == pytest.approx(0, abs=1e-7)
    g = grad(lambda p: kl_to_global(policy, p, theta_g, obs, alive))(theta_g)
    assert all(float(t.abs().max()) < 1e-6 for t in g.values())


def test_kl_grows_with_divergence_and_matches_its_definition() -> None:
    policy, theta_g, obs, alive, direction = _policy_and_states()
    values = []
    for t in (0.25, 0.5, 1.0, 2.0):
        moved = {n: theta_g[n] + t * direction[n] for n in theta_g}
        values.append(float(kl_to_global(policy, moved, theta_g, obs, alive)))
    assert values == sorted(values) and values[0] > 0
    moved = {n: theta_g[n] + direction[n] for n in theta_g}
    p = torch.softmax(policy.logits(theta_g, obs[:30]), -1)
    q = torch.softmax(policy.logits(moved, obs[:30]), -1)
    by_hand = (p * (p / q).log()).sum(-1).mean()
    torch.testing.assert_close(kl_to_global(policy, moved, theta_g, obs, alive), by_hand)


def test_proximal_term_by_hand() -> None:
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5])}
    b = {"w": torch.tensor([0.0, 0.0]), "b": torch.tensor([-0.5])}
    assert float(proximal_to_global(a, b, 0.1)) == pytest.approx(0.05 * (1 + 4 + 1))
    g = grad(lambda p: proximal_to_global(p, b, 0.1))(b)
    assert all(float(t.abs().max()) == 0 for t in g.values())


# --- faults --------------------------------------------------------------------------------


def test_fault_transforms() -> None:
    own = np.array([[1.0, -2.0, 3.0], [0.5, 0.5, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(
        faulty_reports("sign_flip", own, np.random.default_rng(0)), -2.5 * own
    )
    assert faulty_reports("random_action", own, np.random.default_rng(0)) is own
    noisy = random_noise(own, np.random.default_rng(1))
    assert noisy.dtype == np.float32
    span = np.array([[5.0], [0.5]])
    assert np.all(np.abs(noisy - own) <= 3 * span) and not np.allclose(noisy, own)
    np.testing.assert_array_equal(noisy, random_noise(own, np.random.default_rng(1)))
    with pytest.raises(ValueError, match="unknown fault"):
        faulty_reports("lazy", own, np.random.default_rng(0))  # type: ignore[arg-type]


def test_random_action_agents_act_uniformly() -> None:
    mask = random_action_mask("random_action", 4, {1, 3})
    assert mask is not None and mask.tolist() == [False, True, False, True]
    assert random_action_mask("sign_flip", 4, {1}) is None
    policy = Policy(mlp(4, 2))
    confident = policy.init(0)
    confident["4.bias"] = torch.tensor([50.0, -50.0])  # always action 0 when following it
    params = stack([confident] * 4)
    physics = CARTPOLE.default_physics().expand(4, 5)
    traj = collect(CARTPOLE, policy, params, physics, [1, 2, 3, 4], 20, 500, random_actions=mask)
    share = [float(traj.actions[k][traj.alive[k]].float().mean()) for k in range(4)]
    assert share[0] == 0 and share[2] == 0
    assert 0.35 < share[1] < 0.65 and 0.35 < share[3] < 0.65


# --- physics -------------------------------------------------------------------------------


def test_agent_physics_are_seeded_per_agent_and_in_range() -> None:
    spec = EnvSpec(spread={"length": (0.35, 0.65), "gravity": (9.0, 10.5)})
    many = agent_physics(spec, range(50), seed=3)
    assert many.shape == (50, 5) and many.dtype == torch.float64
    length, gravity = many[:, 3], many[:, 0]
    assert float(length.min()) >= 0.35 and float(length.max()) <= 0.65
    assert float(length.max() - length.min()) > 0.2
    assert float(gravity.min()) >= 9.0 and float(gravity.max()) <= 10.5
    assert torch.all(many[:, [1, 2, 4]] == torch.tensor([1.0, 0.1, 10.0], dtype=torch.float64))
    assert torch.equal(agent_physics(spec, [7], seed=3)[0], many[7])  # alone or in a crowd
    assert not torch.equal(agent_physics(spec, [7], seed=4)[0], many[7])


def test_heldout_parameters_are_their_own_draws() -> None:
    spec = EnvSpec(
        env_id="Acrobot-v1",
        spread={"link_mass_2": (0.8, 1.2)},
        heldout_spread={"link_mass_2": (1.3, 1.6)},
        heldout=6,
    )
    held = heldout_physics(spec, seed=0)
    assert held.shape == (6, 6)
    assert float(held[:, 2].min()) >= 1.3 and float(held[:, 2].max()) <= 1.6
    same_range = EnvSpec(spread={"length": (0.35, 0.65)}, heldout=4)
    held = heldout_physics(same_range, seed=0)
    train = agent_physics(same_range, range(4), seed=0)
    assert float(held[:, 3].min()) >= 0.35 and not torch.equal(held, train)


def test_bad_specs_are_refused() -> None:
    with pytest.raises(ValueError, match="no physical parameter 'mass'"):
        EnvSpec(spread={"mass": (1.0, 2.0)})
    with pytest.raises(ValueError, match="low <= high"):
        EnvSpec(spread={"length": (0.6, 0.4)})
    with pytest.raises(ValueError, match="CartPole-v1"):
        EnvSpec(env_id="Pendulum-v1")  # type: ignore[arg-type]


def test_rl_runs_without_gymnasium() -> None:
    """gymnasium is an extra: the torch pieces import and run without it, and the gymnasium
    collector says how to install it."""
    code = (
        "import sys; sys.modules['gymnasium'] = None\n"
        "import torch\n"
        "from fedforge.rl import collect, fedpg_br, gym_collect, local, single_agent\n"
        "from fedforge.rl.envs import CARTPOLE\n"
        "from fedforge.rl.policy import Policy, mlp, stack\n"
        "p = Policy(mlp(4, 2)); params = stack([p.init(0)])\n"
        "physics = CARTPOLE.default_physics()[None]\n"
        "traj = collect.collect(CARTPOLE, p, params, physics, [1], 2, 50)\n"
        "assert traj.lengths.min() > 0\n"
        "try:\n"
        "    gym_collect.collect_gym(CARTPOLE, p, params, physics, [1], 2, 50)\n"
        "except ImportError as e:\n"
        "    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "pip install 'fedforge[rl]'" in proc.stdout
