"""Centralized evaluation of a model on held-out data."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fedforge.data.datasets import ArrayDataset
from fedforge.train.torch_model import TorchModel


@dataclass(frozen=True)
class Evaluation:
    loss: float
    accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)  # e.g. a backdoor's success rate


@torch.no_grad()
def evaluate(model: TorchModel, data: ArrayDataset, batch_size: int = 2048) -> Evaluation:
    """Mean cross-entropy and accuracy of ``model`` on ``data``."""
    module = model.module
    module.eval()
    x = torch.from_numpy(data.x)
    y = torch.from_numpy(data.y)
    loss_sum, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        logits = module(x[start : start + batch_size])
        target = y[start : start + batch_size]
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        correct += int((logits.argmax(dim=1) == target).sum())
    n = max(len(y), 1)
    return Evaluation(loss=loss_sum / n, accuracy=correct / n)
