"""REINFORCE and GPOMDP are unbiased where the policy gradient is known exactly, and GPOMDP has
the lower variance."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.func import grad

from fedforge.rl.estimators import Estimator, stacked_policy_gradient, step_weights
from fedforge.rl.policy import Policy, mlp, sample_actions
from fedforge.rl.trajectories import Trajectories

BATCHES = 4000  # independent estimates, each from EPISODES episodes
EPISODES = 8
GAMMA = 0.9


def _flat(tensors: dict[str, torch.Tensor], lead: int = 0) -> torch.Tensor:
    return torch.cat([t.reshape(*t.shape[:lead], -1) for t in tensors.values()], dim=-1)


def _estimates(policy: Policy, params: dict[str, torch.Tensor], traj: Trajectories, est: Estimator):
    stacked = {n: p.expand(BATCHES, *p.shape) for n, p in params.items()}
    return _flat(stacked_policy_gradient(policy, stacked, traj, est), lead=1).double()


def _assert_unbiased(estimates: torch.Tensor, exact: torch.Tensor) -> None:
    mean = estimates.mean(0)
    stderr = estimates.std(0) / BATCHES**0.5
    z = (mean - exact).abs() / stderr.clamp_min(1e-12)
    assert float(z.max()) < 4.5, (mean, exact, stderr)
    assert float(exact.abs().max()) > 10 * float(stderr.max())  # the test can tell


# --- one-step bandit: J = sum_a pi(a) r(a), grad of the logits is pi * (r - J) --------------

BANDIT_REWARDS = torch.tensor([1.0, 3.0, -2.0])


def _bandit():
    torch.manual_seed(0)
    policy = Policy(mlp(1, 3, hidden=()))
    params = policy.init(0)
    obs = torch.ones(BATCHES, EPISODES, 1, 1)
    probs = torch.softmax(policy.logits(params, torch.ones(1)), -1)
    actions = torch.multinomial(probs, BATCHES * EPISODES, replacement=True)
    actions = actions.reshape(BATCHES, EPISODES, 1)
    rewards = BANDIT_REWARDS[actions]
    alive = torch.ones_like(actions, dtype=torch.bool)
    none = torch.zeros(BATCHES, EPISODES, dtype=torch.bool)
    traj = Trajectories(obs, actions, rewards, alive, ~none, none)

    def expected_return(p):
        return (torch.softmax(policy.logits(p, torch.ones(1)), -1) * BANDIT_REWARDS).sum()

    return policy, params, traj, _flat(grad(expected_return)(params)).double()


@pytest.mark.parametrize("kind", ["reinforce", "gpomdp"])
@pytest.mark.parametrize("baseline", [False, True])
def test_bandit_estimates_are_unbiased(kind: str, baseline: bool) -> None:
    policy, params, traj, exact = _bandit()
    estimates = _estimates(policy, params, traj, Estimator(kind, GAMMA, baseline))  # type: ignore[arg-type]
    _assert_unbiased(estimates, exact)


def test_bandit_gradient_matches_closed_form() -> None:
    policy, params, _, exact = _bandit()
    pi = torch.softmax(policy.logits(params, torch.ones(1)), -1).double()
    j = (pi * BANDIT_REWARDS.double()).sum()
    closed = pi * (BANDIT_REWARDS.double() - j)  # d J / d bias; the weight's column is equal
    torch.testing.assert_close(exact, torch.cat([closed, closed]), rtol=1e-6, atol=1e-7)


# --- two steps with action-dependent length ----------------------------------------------
# s0 -> a0; a0 = 1 ends the episode with reward R0[1]; a0 = 0 earns R0[0] and leads to s1,
# where a1 earns R1[a1]. J = sum over paths of probability * discounted return.

R0 = torch.tensor([4.0, 1.0])
R1 = torch.tensor([3.0, 6.0])
S0 = torch.tensor([1.0, 0.0])
S1 = torch.tensor([0.0, 1.0])


def _two_step():
    torch.manual_seed(1)
    policy = Policy(mlp(2, 2, hidden=()))
    params = policy.init(3)
    u = torch.rand(BATCHES, EPISODES, 2)
    with torch.no_grad():
        a0 = sample_actions(policy.logits(params, S0).expand(BATCHES, EPISODES, 2), u[..., 0])
        a1 = sample_actions(policy.logits(params, S1).expand(BATCHES, EPISODES, 2), u[..., 1])
    second = a0 == 0
    obs = torch.stack([S0.expand(BATCHES, EPISODES, 2), S1.expand(BATCHES, EPISODES, 2)], 2)
    obs = obs * torch.stack([torch.ones_like(second), second], -1).unsqueeze(-1)
    actions = torch.stack([a0, torch.where(second, a1, 0)], -1)
    rewards = torch.stack([R0[a0], torch.where(second, R1[a1], 0.0)], -1)
    alive = torch.stack([torch.ones_like(second), second], -1)
    traj = Trajectories(obs, actions, rewards, alive, torch.ones_like(second), ~alive[..., 0])

    def expected_return(p):
        pi0 = torch.softmax(policy.logits(p, S0), -1)
        pi1 = torch.softmax(policy.logits(p, S1), -1)
        return pi0[1] * R0[1] + pi0[0] * (R0[0] + GAMMA * (pi1 * R1).sum())

    return policy, params, traj, _flat(grad(expected_return)(params)).double()


@pytest.mark.parametrize("kind", ["reinforce", "gpomdp"])
@pytest.mark.parametrize("baseline", [False, True])
def test_two_step_estimates_are_unbiased(kind: str, baseline: bool) -> None:
    policy, params, traj, exact = _two_step()
    estimates = _estimates(policy, params, traj, Estimator(kind, GAMMA, baseline))  # type: ignore[arg-type]
    _assert_unbiased(estimates, exact)


@pytest.mark.parametrize("baseline", [False, True])
def test_gpomdp_has_lower_variance_than_reinforce(baseline: bool) -> None:
    policy, params, traj, _ = _two_step()
    gpomdp = _estimates(policy, params, traj, Estimator("gpomdp", GAMMA, baseline))
    reinforce = _estimates(policy, params, traj, Estimator("reinforce", GAMMA, baseline))
    assert float(gpomdp.var(0).sum()) < 0.8 * float(reinforce.var(0).sum())


def test_step_weights_by_hand() -> None:
    rewards = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0]])
    alive = torch.tensor([[True, True, False], [True, False, False]])
    gamma = 0.5
    reinforce = step_weights(rewards, alive, Estimator("reinforce", gamma, baseline=False))
    torch.testing.assert_close(reinforce, torch.tensor([[2.0, 2.0, 0.0], [3.0, 0.0, 0.0]]))
    gpomdp = step_weights(rewards, alive, Estimator("gpomdp", gamma, baseline=False))
    torch.testing.assert_close(gpomdp, torch.tensor([[2.0, 1.0, 0.0], [3.0, 0.0, 0.0]]))
    # leave-one-out baselines: returns 2 and 3, each minus the other's
    loo = step_weights(rewards, alive, Estimator("reinforce", gamma, baseline=True))
    torch.testing.assert_close(loo, torch.tensor([[-1.0, -1.0, 0.0], [1.0, 0.0, 0.0]]))
    # per step: x = [[1-3, 1-0, 0], [3-1, 0-1, 0]] summed backwards, masked to the episode
    loo_g = step_weights(rewards, alive, Estimator("gpomdp", gamma, baseline=True))
    torch.testing.assert_close(loo_g, torch.tensor([[-1.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))


def test_estimator_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="gamma"):
        Estimator("gpomdp", 1.5)
    with pytest.raises(ValueError, match="estimator"):
        Estimator("ppo")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 episodes"):
        step_weights(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool), Estimator())


def test_standardized_weights_by_hand() -> None:
    """The FedPG-BR authors' estimator: rewards-to-go standardized within each episode
    (sample std), scaled so the estimate is a mean over the batch's 5 steps."""
    rewards = torch.tensor([[[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0]]])
    weights = step_weights(rewards, rewards > 0, Estimator("standardized", 0.9))
    first = np.array([2.71, 1.9, 1.0])
    second = np.array([1.9, 1.0])
    expected = [
        [*((first - first.mean()) / first.std(ddof=1) * 2 / 5), 0.0],
        [*((second - second.mean()) / second.std(ddof=1) * 2 / 5), 0.0, 0.0],
    ]
    np.testing.assert_allclose(weights[0].numpy(), expected, atol=1e-6)
    one_step = step_weights(torch.ones(1, 1, 3), torch.tensor([[[True, False, False]]]),
                            Estimator("standardized"))  # fmt: skip
    assert one_step.abs().sum() == 0  # no spread: no weight
    with pytest.raises(ValueError, match="without a baseline"):
        Estimator("standardized", baseline=False)
