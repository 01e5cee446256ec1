"""Local training: minibatch SGD over a client's data in a seeded batch order."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from fedforge.data.datasets import ArrayDataset
from fedforge.train.torch_model import TorchModel

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def batch_order(
    num_examples: int, batch_size: int, epochs: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Index batches for ``epochs`` passes, reshuffled each epoch; the last batch may be short.

    Every runtime derives a client's batches from this one function, which is what makes
    sequential and vectorized training take identical steps.
    """
    batches: list[np.ndarray] = []
    for _ in range(epochs):
        perm = rng.permutation(num_examples)
        batches.extend(perm[i : i + batch_size] for i in range(0, num_examples, batch_size))
    return batches


@dataclass(frozen=True)
class LocalSGD:
    """Client optimizer settings: ``epochs`` passes of minibatch SGD.

    The optimizer (and any momentum) is created fresh each round, as in FedAvg.
    """

    lr: float = 0.05
    epochs: int = 1
    batch_size: int = 10
    momentum: float = 0.0
    weight_decay: float = 0.0
    loss_fn: LossFn = F.cross_entropy

    def num_steps(self, num_examples: int) -> int:
        """Local SGD steps a client with ``num_examples`` examples takes per round."""
        return self.epochs * -(-num_examples // self.batch_size)

    def train(self, model: TorchModel, data: ArrayDataset, rng: np.random.Generator) -> float:
        """Train ``model`` in place; return the example-weighted mean training loss."""
        module = model.module
        module.train()
        optimizer = torch.optim.SGD(
            module.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
        )
        x = torch.from_numpy(data.x)
        y = torch.from_numpy(data.y)
        total, seen = 0.0, 0
        for batch in batch_order(len(data), self.batch_size, self.epochs, rng):
            idx = torch.from_numpy(batch)
            optimizer.zero_grad(set_to_none=True)
            loss = self.loss_fn(module(x[idx]), y[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            total += float(loss.detach()) * len(batch)
            seen += len(batch)
        return total / max(seen, 1)
