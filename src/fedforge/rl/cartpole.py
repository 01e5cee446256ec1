"""CartPole-v1 dynamics in torch, batched, each row with its own physical parameters.

The arithmetic is gymnasium 1.x's ``CartPoleEnv.step`` (Euler integrator, default reward) term
for term and in the same order, in float64 as gymnasium keeps its state; observations are
the state cast to float32, as gymnasium returns them. Termination: ``|x| > 2.4`` or
``|theta| > 12 degrees``; every step, the terminating one included, earns reward 1.

Physical parameters (the columns of ``physics``, gymnasium's attribute names): ``gravity``,
``masscart``, ``masspole``, ``length`` (half the pole's length, as in gymnasium) and
``force_mag``. gymnasium derives ``total_mass`` and ``polemass_length`` once in ``__init__``;
here they are derived from the row's parameters at every step, so a gymnasium env given the
same parameters must have both recomputed (:func:`fedforge.rl.envs.configure_gym_env` does).
"""

from __future__ import annotations

import math

import numpy as np
import torch

from fedforge.rl import libm

PARAMETERS = ("gravity", "masscart", "masspole", "length", "force_mag")
DEFAULTS = (9.8, 1.0, 0.1, 0.5, 10.0)
TAU = 0.02
THETA_THRESHOLD = 12 * 2 * math.pi / 360
X_THRESHOLD = 2.4
RESET_BOUND = 0.05


def reset(seeds: list[int]) -> torch.Tensor:
    """Initial states (n, 4) float64: gymnasium's ``reset(seed=s)`` draw for every seed."""
    rows = [np.random.default_rng(s).uniform(-RESET_BOUND, RESET_BOUND, size=(4,)) for s in seeds]
    return torch.from_numpy(np.stack(rows)) if rows else torch.zeros(0, 4, dtype=torch.float64)


def observe(state: torch.Tensor) -> torch.Tensor:
    """The observation of a state: the state as float32 (at reset and after every step)."""
    return state.to(torch.float32)


def step(
    state: torch.Tensor, action: torch.Tensor, physics: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Euler step of every row: ``(next_state, reward, terminated)``.

    ``state`` (..., 4) float64, ``action`` (...) in {0, 1}, ``physics`` (..., 5) float64
    broadcasting against the state's leading dimensions (cast to float64)."""
    x, x_dot, theta, theta_dot = state.unbind(-1)
    physics = physics.to(torch.float64)  # float32 parameters would lose the match
    gravity, masscart, masspole, length, force_mag = physics.unbind(-1)
    total_mass = masspole + masscart
    polemass_length = masspole * length
    force = torch.where(action == 1, force_mag, -force_mag)
    costheta = libm.cos(theta)
    sintheta = libm.sin(theta)
    temp = (force + polemass_length * torch.square(theta_dot) * sintheta) / total_mass
    thetaacc = (gravity * sintheta - costheta * temp) / (
        length * (4.0 / 3.0 - masspole * torch.square(costheta) / total_mass)
    )
    xacc = temp - polemass_length * thetaacc * costheta / total_mass
    x = x + TAU * x_dot
    x_dot = x_dot + TAU * xacc
    theta = theta + TAU * theta_dot
    theta_dot = theta_dot + TAU * thetaacc
    next_state = torch.stack(torch.broadcast_tensors(x, x_dot, theta, theta_dot), dim=-1)  # type: ignore[no-untyped-call]
    terminated = (
        (x < -X_THRESHOLD)
        | (x > X_THRESHOLD)
        | (theta < -THETA_THRESHOLD)
        | (theta > THETA_THRESHOLD)
    )
    reward = torch.ones_like(x, dtype=torch.float32)
    return next_state, reward, terminated
