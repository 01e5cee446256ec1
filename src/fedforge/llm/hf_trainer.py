"""A Hugging Face ``Trainer`` as a client's local work (``client.train``): set
``client.train = "fedforge.llm.hf_trainer:train"``, or copy :func:`train` and change it.

The ``Trainer`` runs the round's epochs of SGD (the run's ``client`` learning rate, momentum,
weight decay and batch size, a constant schedule, the task's seed) on the client's examples,
with the loss computed by a thin wrapper around the model (cross-entropy of its logits). It
trains the module fedforge hands it in place; fedforge then reads the trained adapters. No
checkpoint, log or report is written (its output directory is a temporary one).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fedforge.llm.models import require
from fedforge.workload.base import TrainConfig


class WithLoss(nn.Module):
    """``forward(x, labels)`` -> ``{"loss", "logits"}``, the form a ``Trainer`` expects."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        logits = self.model(x)
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


def train(model: nn.Module, loader: Any, config: TrainConfig) -> Mapping[str, float]:
    """The client's epochs through ``transformers.Trainer``; returns its mean training loss."""
    transformers = require("transformers")
    rows = [{"x": x, "labels": y} for x, y in loader.dataset]
    with tempfile.TemporaryDirectory() as out:
        args = transformers.TrainingArguments(
            output_dir=out,
            num_train_epochs=config.epochs,
            per_device_train_batch_size=config.batch_size or len(rows),
            learning_rate=config.lr,
            lr_scheduler_type="constant",
            seed=config.seed % 2**32,
            use_cpu=True,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        trainer = transformers.Trainer(
            model=WithLoss(model),
            args=args,
            train_dataset=rows,
            optimizers=(config.sgd(model), None),
        )
        result = trainer.train()
    return {"train_loss": float(result.training_loss)}
