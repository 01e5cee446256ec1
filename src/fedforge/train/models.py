"""Built-in model architectures, created with an explicit seed.

Every model here is a function of the input shape and the number of classes, has no buffers
and no dropout, so the vectorized runtime batches it with ``torch.func.vmap`` (convolutions
included). Image models take ``(C, H, W)`` examples or the same examples flattened (as
``mnist5k`` stores them): :class:`ToImage` reshapes either.
"""

from __future__ import annotations

import math
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


class ToImage(nn.Module):
    """Reshape each example to ``(C, H, W)``: flat vectors and images alike."""

    def __init__(self, shape: Sequence[int]) -> None:
        super().__init__()
        self.shape = tuple(int(s) for s in shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


def fedavg_cnn(
    shape: Sequence[int],
    num_classes: int,
    channels: Sequence[int] = (32, 64),
    dense: int = 512,
) -> nn.Module:
    """The FedAvg paper's CNN (McMahan et al. 2017): two 5x5 convolutions (32 and 64
    channels, 'same' padding), each followed by ReLU and 2x2 max pooling, a fully connected
    layer of 512 ReLU units and a linear output; 1,663,370 parameters on 28x28 MNIST."""
    c, h, w = _image_shape(shape)
    first, second = _two(channels)
    side_h, side_w = h // 4, w // 4
    if side_h < 1 or side_w < 1:
        raise ValueError(f"the CNN pools twice by 2: images of {h}x{w} are too small")
    return nn.Sequential(
        ToImage((c, h, w)),
        nn.Conv2d(c, first, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(first, second, 5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(second * side_h * side_w, dense),
        nn.ReLU(),
        nn.Linear(dense, num_classes),
    )


class ResidualBlock(nn.Module):
    """``relu(x + conv(relu(norm(conv(x)))))`` with 3x3 convolutions; GroupNorm keeps no
    running statistics, so the block has no buffers and batches under ``vmap``."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1)
        self.norm = nn.GroupNorm(min(8, width), width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x + self.conv2(torch.relu(self.norm(self.conv1(x)))))


def residual_cnn(
    shape: Sequence[int], num_classes: int, channels: Sequence[int] = (16, 32)
) -> nn.Module:
    """A small residual CNN: a 3x3 stem, then per width one residual block and a strided
    3x3 convolution to the next width (the last one halves the resolution too), global
    average pooling and a linear output."""
    c, _, _ = _image_shape(shape)
    if not channels:
        raise ValueError("the residual CNN needs at least one width")
    layers: list[nn.Module] = [ToImage(shape), nn.Conv2d(c, channels[0], 3, padding=1), nn.ReLU()]
    for i, width in enumerate(channels):
        layers.append(ResidualBlock(width))
        following = channels[i + 1] if i + 1 < len(channels) else width
        layers += [nn.Conv2d(width, following, 3, stride=2, padding=1), nn.ReLU()]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels[-1], num_classes)]
    return nn.Sequential(*layers)


def _image_shape(shape: Sequence[int]) -> tuple[int, int, int]:
    if len(shape) != 3:
        raise ValueError(f"an image model needs an input shape (C, H, W), got {list(shape)}")
    c, h, w = (int(s) for s in shape)
    return c, h, w


def _two(channels: Sequence[int]) -> tuple[int, int]:
    if len(channels) != 2:
        raise ValueError(f"the FedAvg CNN has two convolutions: channels {list(channels)}")
    return int(channels[0]), int(channels[1])


def flat_features(shape: Sequence[int]) -> int:
    """Features of one example of ``shape`` once flattened."""
    return math.prod(int(s) for s in shape)


def seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module under a private torch RNG seeded with ``seed``; global RNG untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
