"""FedPG-BR's server (Fan et al., NeurIPS 2021, "Fault-Tolerant Federated Reinforcement
Learning with Theoretical Guarantee"), as pure functions.

A round: every agent k estimates the policy gradient ``mu_k`` at the global policy
``theta_0`` from ``B`` of its own trajectories and reports it. The server

1. filters the reports (:func:`byzantine_filter`) and averages the kept ones into ``mu``;
2. draws a number of inner steps ``N`` (:func:`inner_steps`) and runs SCSG from ``theta_0``
   (:func:`scsg_inner_loop`): at ``theta_n`` it samples ``b`` trajectories of its own and
   steps along ``v_n = g(theta_n) - omega * g(theta_0) + mu`` (:func:`scsg_direction`), where
   ``omega = p(tau | theta_0) / p(tau | theta_n)`` per trajectory corrects the reference
   gradient for being measured on trajectories of ``theta_n``;
3. the last ``theta_N`` is the next global policy.

The filter. With ``V = 2 log(2K / delta)`` and ``T_mu = 2 sigma sqrt(V / B)`` (``sigma`` bounds
the deviation of one trajectory's gradient from the true one, Assumption 2 of the paper):

- R1: among the reports with more than K/2 reports within ``T_mu`` of them, take the one
  nearest their mean (``mu_mom``) and keep every report within ``T_mu`` of it;
- R2, if R1 kept fewer than ``(1 - alpha) K``: the same with radius ``2 sigma``.

Radii are those of the authors' released code (``T_mu`` and ``2 sigma``). The triangle
inequality guarantees every honest report is kept only at twice these radii (an honest
report is within ``T_mu`` of every other honest one, and ``mu_mom`` is within ``T_mu`` of one
honest report); ``radius_scale=2`` gives that guaranteed variant. With fewer than K/2 faulty
agents, a group of faulty reports, however they collude, never has a majority around it.

The gradients are :mod:`fedforge.rl.estimators`'; FedPG-BR runs default to its
``standardized`` estimator, the authors' (rewards-to-go standardized within each episode, the
mean over steps): with it the reports' scale stays fixed as episodes grow, so one radius
(``sigma = 0.06`` on CartPole, the authors' ``codes/options.py``) serves the whole run. With
GPOMDP's unnormalized estimates the honest reports' spread grows with the return and a fixed
``sigma`` ends up keeping nobody (bench/README.md section 16).

Settings of the authors' released code (flint-xf-fan/Byzantine-Federated-RL, ``codes/``) that
this module follows: the radii above, ``N ~ Geometric(b / (B + b))`` on {1, 2, ...}, and the
inner loop's early stop once the mean per-step likelihood ratio ``pi_0(a|s) / pi_n(a|s)`` of
the server's sampled steps leaves [0.995, 1.005] (``codes/agent.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from fedforge.aggregate.robust import RobustResult, pairwise_sq_distances
from fedforge.rl.estimators import Estimator, policy_gradient, step_weights
from fedforge.rl.policy import Policy, Tensors
from fedforge.rl.trajectories import Trajectories


def concentration_threshold(sigma: float, batch_size: int, num_agents: int, delta: float) -> float:
    """``T_mu = 2 sigma sqrt(2 log(2K / delta) / B)``: how far two honest B-trajectory
    gradient estimates can be apart, with probability ``1 - delta``."""
    if not (sigma > 0 and batch_size >= 1 and num_agents >= 1 and 0 < delta < 1):
        raise ValueError(
            f"need sigma > 0, B >= 1, K >= 1 and 0 < delta < 1; "
            f"got {sigma}, {batch_size}, {num_agents}, {delta}"
        )
    return 2 * sigma * math.sqrt(2 * math.log(2 * num_agents / delta) / batch_size)


def _majority_center(dist: np.ndarray, radius: float) -> int | None:
    """The report nearest the mean of those with more than K/2 reports within ``radius``
    (``dist`` holds Euclidean distances); None if no report has such a majority."""
    k = len(dist)
    dense = np.flatnonzero((dist <= radius).sum(axis=1) > k / 2)
    if len(dense) == 0:
        return None
    # ||x_i - mean(S)||^2 = mean_j ||x_i - x_j||^2 - const, so the distances suffice.
    spread = (dist[np.ix_(dense, dense)] ** 2).mean(axis=1)
    return int(dense[np.argmin(spread)])


def _keep_near_center(dist: np.ndarray, radius: float) -> np.ndarray:
    """The reports within ``radius`` of the majority center (none if there is no center)."""
    center = _majority_center(dist, radius)
    if center is None:
        return np.zeros(len(dist), dtype=bool)
    kept: np.ndarray = dist[center] <= radius
    return kept


def byzantine_filter(
    reports: np.ndarray,
    sigma: float,
    batch_size: int,
    delta: float,
    alpha: float,
    radius_scale: float = 1.0,
) -> RobustResult:
    """FedPG-BR's filter on a (K, d) stack of gradient reports.

    Returns the mean of the kept reports (float64) and the excluded rows; ``info`` holds
    ``threshold`` (``T_mu``), ``rule`` (1 or 2 for the rule that decided, 0 if neither found
    a majority: then every row is excluded and the update is zero, and the server should
    step on its own gradient alone, as the authors do) and ``kept``."""
    x = np.asarray(reports, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"reports must be a non-empty (K, d) stack, got shape {x.shape}")
    if not 0 <= alpha < 0.5:
        raise ValueError(f"alpha (the faulty fraction tolerated) must be in [0, 0.5), got {alpha}")
    if not radius_scale > 0:
        raise ValueError(f"radius_scale must be > 0, got {radius_scale}")
    k = len(x)
    threshold = concentration_threshold(sigma, batch_size, k, delta)
    dist = np.sqrt(pairwise_sq_distances(x))
    kept, rule = _keep_near_center(dist, radius_scale * threshold), 1
    if kept.sum() < (1 - alpha) * k:
        kept, rule = _keep_near_center(dist, radius_scale * 2 * sigma), 2
    rule = rule if kept.any() else 0
    update = x[kept].mean(axis=0) if kept.any() else np.zeros(x.shape[1])
    info = {"threshold": threshold, "rule": float(rule), "kept": float(kept.sum())}
    return RobustResult(update, np.flatnonzero(~kept), np.zeros(0, np.int64), info)


def inner_steps(batch_size: int, mini_batch: int, rng: np.random.Generator) -> int:
    """SCSG's number of inner steps, ``N ~ Geometric(b / (B + b))`` on {1, 2, ...} (mean
    ``(B + b) / b``), as the authors' code draws it. (SCSG's analysis counts from 0, mean
    ``B / b``: one step fewer on average.)"""
    if batch_size < 1 or mini_batch < 1:
        raise ValueError(f"need B >= 1 and b >= 1, got {batch_size}, {mini_batch}")
    return int(rng.geometric(mini_batch / (batch_size + mini_batch)))


def importance_weights(
    policy: Policy, params_ref: Tensors, params_now: Tensors, traj: Trajectories
) -> torch.Tensor:
    """``omega = prod_h pi_ref(a_h | s_h) / pi_now(a_h | s_h)`` of each of one agent's
    episodes (``traj`` with an agent axis of size 1), shape (E,)."""
    with torch.no_grad():
        ref = policy.log_prob(params_ref, traj.obs[0], traj.actions[0])
        now = policy.log_prob(params_now, traj.obs[0], traj.actions[0])
        return torch.exp(torch.where(traj.alive[0], ref - now, 0.0).sum(dim=-1))


RATIO_BAND = (0.995, 1.005)  # the authors' early stop of the inner loop


def mean_step_ratio(
    policy: Policy, params_ref: Tensors, params_now: Tensors, traj: Trajectories
) -> float:
    """The mean over one agent's sampled steps of ``pi_ref(a | s) / pi_now(a | s)``."""
    with torch.no_grad():
        ref = policy.log_prob(params_ref, traj.obs[0], traj.actions[0])
        now = policy.log_prob(params_now, traj.obs[0], traj.actions[0])
        alive = traj.alive[0]
        return float(torch.exp(ref - now)[alive].mean())


def scsg_direction(
    policy: Policy,
    params_now: Tensors,
    params_ref: Tensors,
    mu: Tensors,
    traj: Trajectories,
    estimator: Estimator,
) -> Tensors:
    """``v = g(theta_n) - omega * g(theta_0) + mu`` from trajectories of ``theta_n``."""
    weights = step_weights(traj.rewards, traj.alive, estimator)[0]
    obs, actions = traj.obs[0], traj.actions[0]
    now = policy_gradient(policy, params_now, obs, actions, weights)
    omega = importance_weights(policy, params_ref, params_now, traj)
    ref = policy_gradient(policy, params_ref, obs, actions, weights * omega.unsqueeze(-1))
    return {name: now[name] - ref[name] + mu[name] for name in now}


def ascent(lr: float) -> Callable[[Tensors, Tensors], Tensors]:
    """The plain step ``theta + lr * v``."""
    return lambda params, direction: {n: p + lr * direction[n] for n, p in params.items()}


def scsg_inner_loop(
    policy: Policy,
    theta0: Tensors,
    mu: Tensors | None,
    steps: int,
    sample: Callable[[Tensors], Trajectories],
    estimator: Estimator,
    step: Callable[[Tensors, Tensors], Tensors],
) -> Tensors:
    """SCSG from ``theta0``: ``steps`` times, sample the server's own trajectories at the
    current policy and ``step`` along :func:`scsg_direction`. ``mu`` None (the filter kept
    nobody) steps along the server's own gradient estimate instead. The importance weights
    are products over whole episodes and grow or vanish as ``theta_n`` leaves ``theta_0``, so
    the loop stops, as the authors' does, before a step whose sampled steps' mean ratio
    (:func:`mean_step_ratio`) leaves ``RATIO_BAND``."""
    params = dict(theta0)
    low, high = RATIO_BAND
    for _ in range(steps):
        traj = sample(params)
        if mu is not None and not low <= mean_step_ratio(policy, theta0, params, traj) <= high:
            break
        if mu is None:
            weights = step_weights(traj.rewards, traj.alive, estimator)[0]
            direction = policy_gradient(policy, params, traj.obs[0], traj.actions[0], weights)
        else:
            direction = scsg_direction(policy, params, theta0, mu, traj, estimator)
        params = step(params, direction)
    return params
