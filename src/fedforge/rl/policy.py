"""The agents' policy: an MLP with categorical actions, pure in its parameters.

``Policy`` holds the module's structure only; parameters travel separately as named tensors
(``dict[str, Tensor]``), one agent's or a stack of agents' along a leading axis. Every function
is written for one agent and ``torch.func.vmap`` runs it over the stack, so a hundred agents'
policies are one tensor program. The default shape is FedPG-BR's CartPole policy: two hidden
layers of 16 tanh units.

Actions are drawn by inverse CDF from uniforms the caller supplies (``sample_actions``), so
two collectors given the same uniforms and the same probabilities pick the same actions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn
from torch.func import functional_call, vmap

from fedforge.train import models

Tensors = dict[str, torch.Tensor]


def mlp(obs_dim: int, num_actions: int, hidden: Sequence[int] = (16, 16)) -> nn.Module:
    """Linear-tanh-...-Linear producing one logit per action."""
    if obs_dim < 1 or num_actions < 2 or any(h < 1 for h in hidden):
        raise ValueError(
            f"need obs_dim >= 1, num_actions >= 2 and positive widths; "
            f"got {obs_dim}, {num_actions}, {list(hidden)}"
        )
    return models.mlp(obs_dim, num_actions, hidden, activation=nn.Tanh)


def _reinitialized(module: nn.Module) -> nn.Module:
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            layer.reset_parameters()
    return module


@dataclass(frozen=True)
class Policy:
    """A categorical policy over ``module``'s logits; the module's own weights are unused."""

    module: nn.Module

    def init(self, seed: int) -> Tensors:
        """Fresh parameters (PyTorch's default initialization) from ``seed`` alone."""
        module = models.seeded(lambda: _reinitialized(self.module), seed)
        return {name: p.detach().clone() for name, p in module.named_parameters()}

    def logits(self, params: Tensors, obs: torch.Tensor) -> torch.Tensor:
        """Logits (..., num_actions) of one agent's observations (..., obs_dim)."""
        return cast(torch.Tensor, functional_call(self.module, params, (obs,)))

    def log_prob(self, params: Tensors, obs: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """log pi(a | s) of one agent for every (observation, action) pair."""
        logp = torch.log_softmax(self.logits(params, obs), dim=-1)
        return logp.gather(-1, actions.unsqueeze(-1)).squeeze(-1)

    def stacked_logits(self, params: Tensors, obs: torch.Tensor) -> torch.Tensor:
        """Logits of a stack of agents: ``params`` and ``obs`` lead with the agent axis."""
        result: torch.Tensor = vmap(self.logits)(params, obs)
        return result


def stack(params: Sequence[Tensors]) -> Tensors:
    """One stack of the agents' parameters (agent axis first)."""
    if not params:
        raise ValueError("cannot stack zero agents' parameters")
    return {name: torch.stack([p[name] for p in params]) for name in params[0]}


def unstack(params: Tensors) -> list[Tensors]:
    """The agents' parameters of a stack, one dict per agent."""
    count = next(iter(params.values())).shape[0]
    return [{name: t[k] for name, t in params.items()} for k in range(count)]


def sample_actions(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Categorical draws by inverse CDF: the first action whose cumulative probability
    exceeds the uniform. ``logits`` (..., n), ``uniforms`` (...) in [0, 1)."""
    cdf = torch.softmax(logits, dim=-1).cumsum(dim=-1)
    return (cdf[..., :-1] <= uniforms.unsqueeze(-1)).sum(dim=-1)


def uniform_actions(uniforms: torch.Tensor, num_actions: int) -> torch.Tensor:
    """Actions uniformly at random from the same uniforms (a random-action agent)."""
    return (uniforms * num_actions).long().clamp(max=num_actions - 1)
