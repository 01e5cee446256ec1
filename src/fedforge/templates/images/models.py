"""The model every site trains: any torch.nn.Module (fedforge calls make_model with the
options of [model] in fedforge.toml, under a torch RNG seeded from the run seed).

This one has no batch norm and no dropout, so fedforge's vectorized runtime can train all the
sites of a round as one batched program (torch.func.vmap, convolutions included): the default
on a GPU. On the CPU, where that is slower for convolutions, and for a model vmap cannot batch,
the sites train on worker processes instead; the log says which ran and why."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two 3x3 convolutions with ReLU, one 2x2 max pooling, a linear output."""

    def __init__(self, channels: int = 1, classes: int = 10, size: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.out = nn.Linear(16 * (size // 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = nn.functional.max_pool2d(torch.relu(self.conv2(x)), 2)
        return self.out(x.flatten(1))


def make_model(channels: int = 1, classes: int = 10, size: int = 8) -> nn.Module:
    return SmallCNN(channels, classes, size)
