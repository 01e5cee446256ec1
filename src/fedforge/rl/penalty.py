"""Keeping an agent's local policy near the global one (FedKL's idea; FedProx's term).

In heterogeneous environments local policy-gradient steps pull each agent's policy toward
its own physics. FedKL (Xie and Song, 2023) penalizes the local objective with the KL
divergence from the global policy on the states the agent visits:

    maximize  J_k(theta) - beta * E_s[ KL( pi_global(. | s) || pi_theta(. | s) ) ]

:func:`kl_to_global` is that expectation over the visited (alive) steps of a batch. The
parameter-space alternative is FedProx's ``mu / 2 ||theta - theta_global||^2``
(:func:`proximal_to_global`, the same term fedforge's FedProx trains with). Both are zero with
zero gradient at the global policy and grow as the local policy moves away.
"""

from __future__ import annotations

import torch

from fedforge.rl.policy import Policy, Tensors
from fedforge.train.program import Proximal


def kl_to_global(
    policy: Policy,
    params: Tensors,
    global_params: Tensors,
    obs: torch.Tensor,
    alive: torch.Tensor,
) -> torch.Tensor:
    """Mean over the alive steps of ``KL(pi_global(. | s) || pi_params(. | s))`` for one agent
    (``obs`` (..., obs_dim), ``alive`` (...)). Differentiable in ``params``."""
    own = torch.log_softmax(policy.logits(params, obs), dim=-1)
    with torch.no_grad():
        ref = torch.log_softmax(policy.logits(global_params, obs), dim=-1)
    kl = (ref.exp() * (ref - own)).sum(dim=-1)
    weight = alive.to(kl.dtype)
    return (kl * weight).sum() / weight.sum().clamp_min(1.0)


def proximal_to_global(params: Tensors, global_params: Tensors, mu: float) -> torch.Tensor:
    """FedProx's ``mu / 2 * ||params - global_params||^2``."""
    return Proximal(mu).value(params, global_params, {})
