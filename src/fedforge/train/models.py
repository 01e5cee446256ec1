"""Built-in model architectures, created with an explicit seed."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn


def mlp(
    in_features: int,
    num_classes: int,
    hidden: Sequence[int] = (200, 200),
    activation: Callable[[], nn.Module] = nn.ReLU,
) -> nn.Module:
    """A multilayer perceptron (ReLU unless ``activation`` says otherwise);
    ``hidden=(200, 200)`` is the FedAvg paper's 2NN."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), activation()]
        width = h
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)


def logistic(in_features: int, num_classes: int) -> nn.Module:
    """Multinomial logistic regression (the FedProx synthetic-data model)."""
    return nn.Sequential(nn.Linear(in_features, num_classes))


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module under a private torch RNG seeded with ``seed``; global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
