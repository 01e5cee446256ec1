"""FedPG-BR's server: the Byzantine filter on constructed gradients, and the SCSG step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.func import grad

from fedforge.rl.estimators import Estimator, policy_gradient, step_weights
from fedforge.rl.faults import faulty_reports
from fedforge.rl.fedpg_br import (
    ascent,
    byzantine_filter,
    concentration_threshold,
    importance_weights,
    inner_steps,
    scsg_direction,
    scsg_inner_loop,
)
from fedforge.rl.policy import Policy, mlp
from fedforge.rl.trajectories import Trajectories

SIGMA, BATCH, DELTA, ALPHA = 1.0, 16, 0.6, 0.4


def _reports(honest: int, faulty: int, spread: float = 0.05, norm: float = 1.0, seed: int = 0):
    """``honest`` noisy copies of one true gradient, then ``faulty`` honest ones to corrupt."""
    rng = np.random.default_rng(seed)
    d = 60
    true = rng.normal(size=d)
    true *= norm / np.linalg.norm(true)
    rows = true + spread * rng.normal(size=(honest + faulty, d))
    return rows, rng


def test_threshold_by_hand() -> None:
    expected = 2 * 1.0 * math.sqrt(2 * math.log(2 * 10 / 0.6) / 16)
    assert concentration_threshold(1.0, 16, 10, 0.6) == pytest.approx(expected)
    with pytest.raises(ValueError, match="0 < delta < 1"):
        concentration_threshold(1.0, 16, 10, 1.5)


@pytest.mark.parametrize("kind", ["sign_flip", "random_noise"])
@pytest.mark.parametrize("faulty", [1, 3, 4])
def test_filter_removes_faulty_and_keeps_honest(kind: str, faulty: int) -> None:
    honest = 10 - faulty
    rows, rng = _reports(honest, faulty, seed=faulty)
    rows[honest:] = faulty_reports(kind, rows[honest:], rng)  # type: ignore[arg-type]
    result = byzantine_filter(rows, SIGMA, BATCH, DELTA, ALPHA)
    assert result.excluded.tolist() == list(range(honest, 10))
    assert result.info["rule"] == 1 and result.info["kept"] == honest
    np.testing.assert_allclose(result.update, rows[:honest].mean(axis=0))
    plain = rows.mean(axis=0)
    assert np.linalg.norm(plain - rows[:honest].mean(0)) > 10 * np.linalg.norm(
        result.update - rows[:honest].mean(0)
    )


def test_colluding_minority_cannot_win() -> None:
    """4 of 9 faulty agents send one identical vector: a tight cluster, but not a majority."""
    rows, _ = _reports(5, 4)
    rows[5:] = -2.5 * rows[:5].mean(axis=0)
    result = byzantine_filter(rows, SIGMA, BATCH, DELTA, ALPHA)
    assert result.excluded.tolist() == [5, 6, 7, 8]


def test_second_rule_when_the_concentration_radius_is_too_tight() -> None:
    """With a huge batch T_mu is tiny: R1 finds no majority and R2 (radius 2 sigma) decides."""
    rows, rng = _reports(7, 3, spread=0.05, norm=3.0)
    rows[7:] = faulty_reports("sign_flip", rows[7:], rng)
    batch = 100_000
    assert concentration_threshold(SIGMA, batch, 10, DELTA) < 0.1  # honest pairs are ~0.55 apart
    result = byzantine_filter(rows, SIGMA, batch, DELTA, ALPHA)
    assert result.info["rule"] == 2
    assert result.excluded.tolist() == [7, 8, 9]


def test_no_majority_keeps_nobody() -> None:
    rows = 10.0 * np.eye(6)  # every pair sqrt(200) apart
    result = byzantine_filter(rows, SIGMA, BATCH, DELTA, ALPHA)
    assert result.info["rule"] == 0 and len(result.excluded) == 6
    assert not result.update.any()


def test_wider_radius_keeps_at_least_as_many() -> None:
    rows, rng = _reports(6, 4, spread=0.12)
    rows[6:] = faulty_reports("random_noise", rows[6:], rng)
    narrow = byzantine_filter(rows, SIGMA, BATCH, DELTA, ALPHA)
    wide = byzantine_filter(rows, SIGMA, BATCH, DELTA, ALPHA, radius_scale=2.0)
    assert set(wide.excluded) <= set(narrow.excluded)


def test_filter_refuses_bad_inputs() -> None:
    with pytest.raises(ValueError, match="alpha"):
        byzantine_filter(np.zeros((3, 2)), SIGMA, BATCH, DELTA, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        byzantine_filter(np.zeros(3), SIGMA, BATCH, DELTA, ALPHA)


# --- SCSG ----------------------------------------------------------------------------------

REWARDS = torch.tensor([1.0, 3.0, -2.0])
ONE = torch.ones(1)


def _bandit_episodes(policy: Policy, params, episodes: int, seed: int) -> Trajectories:
    gen = torch.Generator().manual_seed(seed)
    probs = torch.softmax(policy.logits(params, ONE), -1).detach()
    actions = torch.multinomial(probs, episodes, replacement=True, generator=gen)
    actions = actions.reshape(1, episodes, 1)
    ended = torch.ones(1, episodes, dtype=torch.bool)
    alive = torch.ones(1, episodes, 1, dtype=torch.bool)
    obs = torch.ones(1, episodes, 1, 1)
    return Trajectories(obs, actions, REWARDS[actions], alive, ended, ~ended)


def _bandit_policy():
    policy = Policy(mlp(1, 3, hidden=()))
    theta0 = policy.init(0)
    theta_n = {
        n: t + 0.6 * torch.randn(t.shape, generator=torch.Generator().manual_seed(1))
        for n, t in theta0.items()
    }

    def exact(p):
        return grad(lambda q: (torch.softmax(policy.logits(q, ONE), -1) * REWARDS).sum())(p)

    return policy, theta0, theta_n, exact


def test_importance_weights_by_hand() -> None:
    policy, theta0, theta_n, _ = _bandit_policy()
    traj = _bandit_episodes(policy, theta_n, 6, seed=2)
    omega = importance_weights(policy, theta0, theta_n, traj)
    p0 = torch.softmax(policy.logits(theta0, ONE), -1)
    pn = torch.softmax(policy.logits(theta_n, ONE), -1)
    a = traj.actions[0, :, 0]
    torch.testing.assert_close(omega, (p0[a] / pn[a]).detach())
    torch.testing.assert_close(importance_weights(policy, theta0, theta0, traj), torch.ones(6))


def test_direction_is_mu_at_the_reference_point() -> None:
    policy, theta0, _, _ = _bandit_policy()
    traj = _bandit_episodes(policy, theta0, 8, seed=3)
    mu = {n: torch.full_like(t, 0.25) for n, t in theta0.items()}
    v = scsg_direction(policy, theta0, theta0, mu, traj, Estimator("gpomdp", 1.0, False))
    for name in mu:
        torch.testing.assert_close(v[name], mu[name])


def test_correction_estimates_the_gradient_difference() -> None:
    """E over trajectories of theta_n of g(theta_n) - omega g(theta_0) = grad J(theta_n) -
    grad J(theta_0); without omega it would not be."""
    policy, theta0, theta_n, exact = _bandit_policy()
    traj = _bandit_episodes(policy, theta_n, 40_000, seed=4)
    zero = {n: torch.zeros_like(t) for n, t in theta0.items()}
    est = Estimator("reinforce", 1.0, False)
    v = scsg_direction(policy, theta_n, theta0, zero, traj, est)
    g_n, g_0 = exact(theta_n), exact(theta0)
    for name in v:
        torch.testing.assert_close(v[name], g_n[name] - g_0[name], rtol=0, atol=0.05)
    weights = step_weights(traj.rewards, traj.alive, est)[0]
    obs, actions = traj.obs[0], traj.actions[0]
    naive_now = policy_gradient(policy, theta_n, obs, actions, weights)
    naive_ref = policy_gradient(policy, theta0, obs, actions, weights)  # omega left out
    error = max(float((naive_now[n] - naive_ref[n] - g_n[n] + g_0[n]).abs().max()) for n in v)
    assert error > 0.15  # three times the tolerance the weighted estimate meets


def test_inner_steps_follow_the_geometric_law() -> None:
    rng = np.random.default_rng(0)
    draws = np.array([inner_steps(16, 4, rng) for _ in range(20_000)])
    assert draws.min() >= 1
    assert draws.mean() == pytest.approx((16 + 4) / 4, rel=0.03)


def test_inner_loop_climbs_and_falls_back_without_mu() -> None:
    policy, theta0, _, exact = _bandit_policy()
    seeds = iter(range(100, 200))

    def sample(params):
        return _bandit_episodes(policy, params, 64, seed=next(seeds))

    def value(p):
        return float((torch.softmax(policy.logits(p, ONE), -1) * REWARDS).sum())

    est = Estimator("gpomdp", 1.0, True)
    mu = exact(theta0)
    stepped = scsg_inner_loop(policy, theta0, mu, 5, sample, est, ascent(0.5))
    alone = scsg_inner_loop(policy, theta0, None, 5, sample, est, ascent(0.5))
    assert value(stepped) > value(theta0) + 0.3 and value(alone) > value(theta0) + 0.3
    unchanged = scsg_inner_loop(policy, theta0, mu, 0, sample, est, ascent(0.5))
    assert all(torch.equal(unchanged[n], theta0[n]) for n in theta0)


def test_inner_loop_stops_once_the_step_ratio_leaves_the_band() -> None:
    """The authors' early stop: a step that moves the policy so far that the sampled steps'
    mean ratio pi_0 / pi_n leaves [0.995, 1.005] ends the loop (the step before it stands);
    tiny steps run all of them; without mu (the server alone) there is no reference."""
    policy, theta0, _, exact = _bandit_policy()
    seeds = iter(range(300, 400))
    taken: list[int] = []

    def sample(params):
        return _bandit_episodes(policy, params, 64, seed=next(seeds))

    def counted(lr: float):
        def step(params, direction):
            taken.append(1)
            return ascent(lr)(params, direction)

        return step

    est, mu = Estimator("gpomdp", 1.0, True), exact(theta0)
    far = scsg_inner_loop(policy, theta0, mu, 5, sample, est, counted(5.0))
    assert len(taken) == 1 and not all(torch.equal(far[n], theta0[n]) for n in theta0)
    taken.clear()
    scsg_inner_loop(policy, theta0, mu, 5, sample, est, counted(1e-4))
    assert len(taken) == 5
    taken.clear()
    scsg_inner_loop(policy, theta0, None, 5, sample, est, counted(5.0))
    assert len(taken) == 5
