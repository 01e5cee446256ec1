"""Acrobot-v1 dynamics in torch, batched, each row with its own physical parameters.

gymnasium 1.x's ``AcrobotEnv.step`` ("book" dynamics, no torque noise) term for term: one
fourth-order Runge-Kutta step of ``dt = 0.2`` over the state augmented with the torque, the
angles wrapped into [-pi, pi] by repeated subtraction of 2 pi (as gymnasium's ``wrap``), the
velocities clipped to 4 pi and 9 pi. Float dtypes follow gymnasium: ``reset`` draws float64
uniforms and rounds them to float32, and every later state is float64 (``np.append``
promotes it). So gymnasium computes the first observation's cos and sin in float32 on the
float32 state (:func:`observe_reset`; NumPy's float32 cos is not always the float64 one
rounded) and every later one in float64, rounded to float32 (:func:`observe`). cos, sin and
squares go through :mod:`fedforge.rl.libm` so that they round as gymnasium's NumPy scalars
do: the trajectories then agree bit for bit.

Termination: the free end above the bar, ``-cos(t1) - cos(t1 + t2) > 1`` (gymnasium's test
assumes unit link lengths whatever ``LINK_LENGTH_1`` is; so does this one). Reward -1 per step,
0 on the terminating step.

Physical parameters (columns of ``physics``; gymnasium's class attributes in brackets):
``link_length_1`` [LINK_LENGTH_1], ``link_mass_1`` [LINK_MASS_1], ``link_mass_2``
[LINK_MASS_2], ``link_com_pos_1`` [LINK_COM_POS_1], ``link_com_pos_2`` [LINK_COM_POS_2],
``link_moi`` [LINK_MOI, both links]. ``LINK_LENGTH_2`` only draws the picture in gymnasium and
gravity is a literal 9.8 there, so neither is a parameter here.
"""

from __future__ import annotations

from math import pi

import numpy as np
import torch

from fedforge.rl import libm

PARAMETERS = (
    "link_length_1",
    "link_mass_1",
    "link_mass_2",
    "link_com_pos_1",
    "link_com_pos_2",
    "link_moi",
)
DEFAULTS = (1.0, 1.0, 1.0, 0.5, 0.5, 1.0)
DT = 0.2
GRAVITY = 9.8
MAX_VEL_1 = 4 * pi
MAX_VEL_2 = 9 * pi
TORQUES = (-1.0, 0.0, 1.0)
RESET_BOUND = 0.1


def reset(seeds: list[int]) -> torch.Tensor:
    """Initial states (n, 4) float64 holding gymnasium's float32-rounded ``reset(seed=s)``."""
    rows = [
        np.random.default_rng(s).uniform(-RESET_BOUND, RESET_BOUND, size=(4,)).astype(np.float32)
        for s in seeds
    ]
    if not rows:
        return torch.zeros(0, 4, dtype=torch.float64)
    return torch.from_numpy(np.stack(rows)).to(torch.float64)


def observe(state: torch.Tensor) -> torch.Tensor:
    """``[cos t1, sin t1, cos t2, sin t2, dt1, dt2]``, computed in float64, as float32."""
    t1, t2, v1, v2 = state.unbind(-1)
    obs = torch.stack((libm.cos(t1), libm.sin(t1), libm.cos(t2), libm.sin(t2), v1, v2), -1)
    return obs.to(torch.float32)


def observe_reset(state: torch.Tensor) -> torch.Tensor:
    """The first observation, computed in float32 as gymnasium does on its float32 state."""
    return observe(state.to(torch.float32))


def _derivatives(s: torch.Tensor, torque: torch.Tensor, physics: torch.Tensor) -> torch.Tensor:
    """gymnasium's ``_dsdt`` (book dynamics) for every row; the torque's derivative is 0.
    Same terms in the same order; ``sq`` is gymnasium's ``**2`` (C ``pow``)."""
    sq, cos, sin = libm.squared, libm.cos, libm.sin
    l1, m1, m2, lc1, lc2, moi = physics.unbind(-1)
    i1 = i2 = moi
    g = GRAVITY
    theta1, theta2, dtheta1, dtheta2 = s.unbind(-1)
    d1 = m1 * sq(lc1) + m2 * (sq(l1) + sq(lc2) + 2 * l1 * lc2 * cos(theta2)) + i1 + i2
    d2 = m2 * (sq(lc2) + l1 * lc2 * cos(theta2)) + i2
    phi2 = m2 * lc2 * g * cos(theta1 + theta2 - pi / 2.0)
    phi1 = (
        -m2 * l1 * lc2 * sq(dtheta2) * sin(theta2)
        - 2 * m2 * l1 * lc2 * dtheta2 * dtheta1 * sin(theta2)
        + (m1 * lc1 + m2 * l1) * g * cos(theta1 - pi / 2)
        + phi2
    )
    ddtheta2 = (torque + d2 / d1 * phi1 - m2 * l1 * lc2 * sq(dtheta1) * sin(theta2) - phi2) / (
        m2 * sq(lc2) + i2 - sq(d2) / d1
    )
    ddtheta1 = -(d2 * ddtheta2 + phi1) / d1
    parts = torch.broadcast_tensors(dtheta1, dtheta2, ddtheta1, ddtheta2)  # type: ignore[no-untyped-call]
    return torch.stack(parts, dim=-1)


def _wrap(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """gymnasium's ``wrap``: subtract or add ``high - low`` until ``low <= x <= high``."""
    diff = high - low
    while bool((x > high).any()):
        x = torch.where(x > high, x - diff, x)
    while bool((x < low).any()):
        x = torch.where(x < low, x + diff, x)
    return x


def step(
    state: torch.Tensor, action: torch.Tensor, physics: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One RK4 step of every row: ``(next_state, reward, terminated)``.

    ``state`` (..., 4) float64, ``action`` (...) in {0, 1, 2}, ``physics`` (..., 6) float64
    broadcasting against the state's leading dimensions (cast to float64)."""
    physics = physics.to(torch.float64)  # float32 parameters would lose the match
    torque = torch.tensor(TORQUES, dtype=torch.float64, device=state.device)[action]
    dt = DT - 0
    dt2 = dt / 2.0
    k1 = _derivatives(state, torque, physics)
    k2 = _derivatives(state + dt2 * k1, torque, physics)
    k3 = _derivatives(state + dt2 * k2, torque, physics)
    k4 = _derivatives(state + dt * k3, torque, physics)
    ns = state + dt / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    t1 = _wrap(ns[..., 0], -pi, pi)
    t2 = _wrap(ns[..., 1], -pi, pi)
    v1 = ns[..., 2].clamp(-MAX_VEL_1, MAX_VEL_1)
    v2 = ns[..., 3].clamp(-MAX_VEL_2, MAX_VEL_2)
    next_state = torch.stack((t1, t2, v1, v2), dim=-1)
    terminated = -libm.cos(t1) - libm.cos(t2 + t1) > 1.0
    reward = torch.where(terminated, 0.0, -1.0).to(torch.float32)
    return next_state, reward, terminated
