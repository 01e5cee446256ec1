"""Policy-gradient estimators as pure functions: REINFORCE with a baseline, and GPOMDP.

Both estimate the gradient of the discounted return ``J = E[sum_h gamma^h r_h]`` (an ascent
direction) from E episodes as ``(1/E) sum_e sum_i grad log pi(a_i | s_i) w[e, i]``; they differ
only in the per-step weights ``w``, computed from rewards alone by :func:`step_weights`:

- REINFORCE: ``w[e, i] = R_e - b_e`` with ``R_e = sum_h gamma^h r_h`` the episode's return.
- GPOMDP (Baxter & Bartlett 2001): ``w[e, i] = sum_{h >= i} (gamma^h r_h - b_h)``; a reward is
  credited only to the actions before it, which lowers the variance.
- ``standardized``, the FedPG-BR authors' estimator (flint-xf-fan/Byzantine-Federated-RL,
  ``codes/worker.py``, ``collect_experience_for_training`` and ``train_one_epoch``): each
  episode's discounted rewards-to-go ``G_i = sum_{h >= i} gamma^(h-i) r_h`` standardized
  within the episode (mean 0, unit sample standard deviation), and the estimate their mean
  over all the batch's steps, ``(1/sum_e T_e) sum_e sum_i grad log pi(a_i | s_i) w[e, i]``.
  Biased, but its scale does not grow with the episodes' length or return, which is what lets
  FedPG-BR's filter use one fixed radius (``sigma = 0.06`` on CartPole) for a whole run. An
  episode of one step has no spread: its weight is zero.

Baselines (``baseline=True``) are leave-one-out means over the other episodes of the batch:
``b_e`` the mean return of the others, ``b_h`` the mean of the others' ``gamma^h r_h`` (zero
past their end). They do not depend on the episode they are subtracted from, so both
estimators stay unbiased; GPOMDP's ``b_h`` is subtracted at every step up to the batch's
length even past the episode's end (an absorbing state), which keeps the baseline term's
expectation zero when episode lengths depend on the actions. A baseline needs E >= 2.

Everything works on one agent's tensors with the episode and step axes last, and on a leading
agent axis by ``vmap`` (:func:`stacked_policy_gradient`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch.func import grad, vmap

from fedforge.rl.policy import Policy, Tensors
from fedforge.rl.trajectories import Trajectories

EstimatorKind = Literal["reinforce", "gpomdp", "standardized"]


@dataclass(frozen=True)
class Estimator:
    """Which estimator, with which discount, and whether it subtracts a baseline
    (``standardized`` centres each episode's rewards-to-go: it needs ``baseline=True``)."""

    kind: EstimatorKind = "gpomdp"
    gamma: float = 0.999
    baseline: bool = True

    def __post_init__(self) -> None:
        if self.kind not in ("reinforce", "gpomdp", "standardized"):
            raise ValueError(
                f"estimator must be 'reinforce', 'gpomdp' or 'standardized', got {self.kind!r}"
            )
        if self.kind == "standardized" and not self.baseline:
            raise ValueError(
                "the standardized estimator subtracts each episode's mean reward-to-go: it "
                "cannot run without a baseline (set baseline = true, or choose gpomdp)"
            )
        if not (math.isfinite(self.gamma) and 0 < self.gamma <= 1):
            raise ValueError(f"discount gamma must be in (0, 1], got {self.gamma}")


def _leave_one_out_mean(x: torch.Tensor, dim: int) -> torch.Tensor:
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"a leave-one-out baseline needs >= 2 episodes per agent, got {n}")
    return (x.sum(dim=dim, keepdim=True) - x) / (n - 1)


def step_weights(rewards: torch.Tensor, alive: torch.Tensor, estimator: Estimator) -> torch.Tensor:
    """The weight of every step's log-probability, (..., E, T) float32, zero past the end.

    ``rewards`` (..., E, T) must be zero past each episode's end (the collectors' layout)."""
    if estimator.kind == "standardized":
        return _standardized_weights(rewards, alive, estimator.gamma)
    steps = rewards.shape[-1]
    discounts = estimator.gamma ** torch.arange(steps, dtype=torch.float64)
    discounted = rewards.to(torch.float64) * discounts
    if estimator.kind == "reinforce":
        returns = discounted.sum(dim=-1)
        if estimator.baseline:
            returns = returns - _leave_one_out_mean(returns, dim=-1)
        weights = returns.unsqueeze(-1).expand_as(discounted)
    else:
        if estimator.baseline:
            discounted = discounted - _leave_one_out_mean(discounted, dim=-2)
        weights = discounted.flip(-1).cumsum(dim=-1).flip(-1)
    return torch.where(alive, weights, 0.0).to(torch.float32)


def _standardized_weights(rewards: torch.Tensor, alive: torch.Tensor, gamma: float) -> torch.Tensor:
    """Rewards-to-go standardized within each episode, scaled by ``E / sum_e T_e`` so that
    :func:`surrogate`'s ``1/E`` makes the estimate a mean over the batch's steps."""
    r = rewards.to(torch.float64)
    to_go = torch.zeros_like(r)  # sum_{h >= i} gamma^(h-i) r_h, zero past the end
    running = torch.zeros_like(r[..., 0])
    for i in range(r.shape[-1] - 1, -1, -1):
        running = r[..., i] + gamma * running
        to_go[..., i] = running
    live = alive.to(torch.float64)
    length = live.sum(dim=-1, keepdim=True)
    mean = (to_go * live).sum(dim=-1, keepdim=True) / length.clamp(min=1)
    var = (((to_go - mean) * live) ** 2).sum(dim=-1, keepdim=True) / (length - 1).clamp(min=1)
    std = var.sqrt()
    z = torch.where(std > 0, (to_go - mean) / torch.where(std > 0, std, 1.0), 0.0)
    episodes = alive.shape[-2]
    total = live.sum(dim=(-2, -1), keepdim=True).clamp(min=1)
    return torch.where(alive, z * episodes / total, 0.0).to(torch.float32)


def surrogate(
    policy: Policy,
    params: Tensors,
    obs: torch.Tensor,
    actions: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """``(1/E) sum log pi(a | s) * w``: its gradient in ``params`` is the estimate."""
    episodes = actions.shape[-2]
    return (policy.log_prob(params, obs, actions) * weights).sum() / episodes


def policy_gradient(
    policy: Policy,
    params: Tensors,
    obs: torch.Tensor,
    actions: torch.Tensor,
    weights: torch.Tensor,
) -> Tensors:
    """One agent's gradient estimate (ascent direction of J) from its (E, T) episodes."""
    return cast(Tensors, grad(surrogate, argnums=1)(policy, params, obs, actions, weights))


def stacked_policy_gradient(
    policy: Policy, params: Tensors, traj: Trajectories, estimator: Estimator
) -> Tensors:
    """Every agent's gradient estimate at once: ``params`` stacked over the agent axis,
    ``traj`` the agents' episodes in the same order."""
    weights = step_weights(traj.rewards, traj.alive, estimator)
    per_agent = vmap(policy_gradient, in_dims=(None, 0, 0, 0, 0))
    grads: Tensors = per_agent(policy, params, traj.obs, traj.actions, weights)
    return grads
