"""An agent's work in a round is the same on both collectors, the penalty holds it near the
global policy, and the plain single-agent loop learns."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad

from fedforge.rl.collect import collect
from fedforge.rl.envs import CARTPOLE
from fedforge.rl.estimators import Estimator, stacked_policy_gradient
from fedforge.rl.local import (
    LocalRL,
    estimate_gradients,
    evaluate,
    local_update,
    penalized_gradient,
)
from fedforge.rl.penalty import kl_to_global
from fedforge.rl.physics import EnvSpec, agent_physics, heldout_physics
from fedforge.rl.policy import Policy, mlp, stack, unstack

pytest.importorskip("gymnasium")
from fedforge.rl.gym_collect import collect_gym
from fedforge.rl.single_agent import train_single_agent

SPEC = EnvSpec(spread={"length": (0.35, 0.65)}, heldout=3)
POLICY = Policy(mlp(4, 2))


def _round(agents: int):
    theta_g = POLICY.init(0)
    return theta_g, stack([theta_g] * agents), agent_physics(SPEC, range(agents), seed=1)


def test_local_update_is_the_same_on_gymnasium() -> None:
    theta_g, params, physics = _round(2)
    cfg = LocalRL(Estimator("gpomdp", 0.99, True), episodes=3, horizon=200, iterations=2, lr=0.05)
    fast = local_update(cfg, CARTPOLE, POLICY, params, theta_g, physics, [5, 6])
    slow = local_update(
        cfg, CARTPOLE, POLICY, params, theta_g, physics, [5, 6], collector=collect_gym
    )
    for name in theta_g:
        torch.testing.assert_close(fast.params[name], slow.params[name])
        assert not torch.equal(fast.params[name], params[name])
    torch.testing.assert_close(fast.mean_return, slow.mean_return)
    assert fast.trajectories == 6


def test_gradient_reports_match_the_estimator() -> None:
    _, params, physics = _round(3)
    est = Estimator("reinforce", 0.999, True)
    grads, traj = estimate_gradients(CARTPOLE, POLICY, params, physics, [1, 2, 3], 4, 500, est)
    again = stacked_policy_gradient(POLICY, params, traj, est)
    assert all(torch.equal(grads[n], again[n]) for n in grads)
    assert grads["0.weight"].shape == (3, 16, 4)
    slow, _ = estimate_gradients(
        CARTPOLE, POLICY, params, physics, [1, 2, 3], 4, 500, est, collector=collect_gym
    )
    assert all(torch.allclose(grads[n], slow[n]) for n in grads)


def test_penalized_gradient_composes_the_penalties() -> None:
    """The local ascent direction is the estimate minus beta grad KL minus mu (theta - global),
    and the plain estimate at the global policy."""
    theta_g, params, physics = _round(2)
    moved = {
        n: t + 0.3 * torch.randn(t.shape, generator=torch.Generator().manual_seed(4))
        for n, t in params.items()
    }
    est = Estimator("gpomdp", 0.99, True)
    traj = collect(CARTPOLE, POLICY, moved, physics, [1, 2], 4, 200)
    beta, mu = 2.0, 0.5
    both = penalized_gradient(POLICY, moved, theta_g, traj, est, kl=beta, prox=mu)
    plain = stacked_policy_gradient(POLICY, moved, traj, est)
    for k, own in enumerate(unstack(moved)):
        kl_grad = grad(kl_to_global, argnums=1)(POLICY, own, theta_g, traj.obs[k], traj.alive[k])
        for n in own:
            expected = plain[n][k] - beta * kl_grad[n] - mu * (own[n] - theta_g[n])
            torch.testing.assert_close(both[n][k], expected, rtol=1e-4, atol=1e-5)
            assert float(kl_grad[n].abs().max()) > 1e-3  # the KL term is not vacuous here
    at_global = penalized_gradient(POLICY, params, theta_g, traj, est, kl=beta, prox=mu)
    plain_g = stacked_policy_gradient(POLICY, params, traj, est)
    for n in at_global:
        torch.testing.assert_close(at_global[n], plain_g[n], rtol=1e-5, atol=1e-6)


def test_evaluation_on_own_and_heldout_physics() -> None:
    theta_g, _, physics = _round(2)
    held = heldout_physics(SPEC, seed=1)
    own = evaluate(CARTPOLE, POLICY, theta_g, physics, 2, 500, seed=9)
    on_heldout = evaluate(CARTPOLE, POLICY, theta_g, held, 2, 500, seed=9)
    assert own.shape == (2,) and on_heldout.shape == (3,)
    torch.testing.assert_close(
        on_heldout, evaluate(CARTPOLE, POLICY, theta_g, held, 2, 500, seed=9, collector=collect_gym)
    )


def test_single_agent_gymnasium_loop_learns() -> None:
    run = train_single_agent(CARTPOLE, Estimator("gpomdp", 0.999, True), 10, 500, 0.02, 80, seed=2)
    returns = [r for _, r in run.history]
    assert [n for n, _ in run.history] == list(range(10, 90, 10))
    assert sum(returns[-2:]) > 1.5 * sum(returns[:2])


def test_local_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="lr > 0"):
        LocalRL(lr=0.0)
    with pytest.raises(ValueError, match=">= 1"):
        LocalRL(episodes=0)
