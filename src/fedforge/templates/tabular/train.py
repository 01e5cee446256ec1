"""Your own training loop (enable it with `train = "train:train"` under [client]).

fedforge calls train(model, loader, config) on each site every round: ``model`` holds the
global model (train it in place), ``loader`` the site's training data (shuffled from the run
seed), ``config`` the run's [client] settings (epochs, lr, batch_size, momentum, weight_decay)
and FedProx's ``mu``. The update sent is the trained model minus the global one. This loop
adds FedProx's proximal term, so it also runs ``algorithm.name = "fedprox"`` once
``[client] train_proximal = true`` says so."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fedforge import TrainConfig


def train(
    model: nn.Module, loader: Iterable[tuple[torch.Tensor, torch.Tensor]], config: TrainConfig
) -> dict[str, float]:
    optimizer = config.sgd(model)  # SGD with the run's lr, momentum and weight decay
    total, seen = 0.0, 0
    for _ in range(config.epochs):
        for x, y in loader:
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            (loss + config.proximal(model)).backward()  # the proximal term is 0 unless FedProx
            optimizer.step()
            total += float(loss.detach()) * len(y)
            seen += len(y)
    return {"train_loss": total / max(seen, 1)}
