"""Your training loop as a client's local work: ``train(model, loader, config)``.

The function trains the module in place, starting from the global model (FedPer's personal
head from the client's state), on a ``DataLoader`` over the client's training examples
shuffled from the task's seed; torch's RNG is seeded from the task too. The record is then
what the algorithm makes of the trained weights (``local - global`` for FedAvg), so every
stage, aggregation kind and runtime but the vectorized one runs it unchanged.

Algorithms that need the built-in program's internals (gradient corrections, a step count of
plain SGD, a second copy trained on the same batches) refuse it; FedProx runs it when the
loop adds ``config.proximal(model)`` to its loss and says so (``Workload(proximal=True)``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, TensorDataset

from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.data.datasets import ArrayDataset
from fedforge.train.program import LocalProgram, LocalSGD, Proximal, Tensors
from fedforge.workload.base import TrainConfig, TrainFunction
from fedforge.workload.imports import call_user

TRAIN_LOSS = "train_loss"
MAX_METRICS = 64


@dataclass(frozen=True)
class UserLoop:
    """A training function and what it declares: the metrics it may report beside
    ``train_loss``, and whether it adds the proximal term when ``config.mu`` > 0."""

    function: TrainFunction
    metrics: tuple[str, ...] = ()
    proximal: bool = False

    def __post_init__(self) -> None:
        if len(self.metrics) > MAX_METRICS or TRAIN_LOSS in self.metrics:
            raise ConfigError(
                f"Workload.metrics names at most {MAX_METRICS} metrics beside train_loss"
            )


def loop_problem(
    algorithm_name: str,
    refusal: str | None,
    program: LocalProgram,
    loop: UserLoop,
    sample_dp: bool = False,
) -> str | None:
    """Why ``loop`` cannot replace the local ``program`` of the algorithm (whose class gives
    ``refusal``), or run with DP-SGD (``sample_dp``); None when it can."""
    if sample_dp:
        return (
            "DP-SGD (sample-level DP) clips and noises each example's gradient inside the "
            "built-in loop: it cannot run a training function (use central or local DP)"
        )
    if refusal is not None:
        return (
            f"{algorithm_name} cannot run a training function: {refusal}, which a training "
            "function's own loop does not expose"
        )
    if program.corrections or program.personal or program.head_first or program.initial_loss:
        return f"{algorithm_name}'s local program cannot be replaced by a training function"
    for term in program.terms:
        if not isinstance(term, Proximal):
            return f"{algorithm_name} adds {type(term).__name__} to the local objective"
        if term.mu > 0 and not loop.proximal:
            return (
                f"{algorithm_name} adds mu/2 ||w - w_global||^2 to the local objective: the "
                "training function must add config.proximal(model) to its loss and declare "
                "it with Workload(proximal=True) or client.train_proximal = true"
            )
    return None


def proximal_mu(program: LocalProgram) -> float:
    return sum(t.mu for t in program.terms if isinstance(t, Proximal))


def run_loop(
    loop: UserLoop,
    module: torch.nn.Module,
    data: ArrayDataset,
    local: LocalSGD,
    *,
    epochs: int,
    round_number: int,
    seed: int,
    mu: float,
    shared: Tensors,
) -> tuple[int, dict[str, float]]:
    """Run the training function on ``module``; (steps, metrics with ``train_loss``). Steps
    are the configured local SGD steps (the loop's own are unknown)."""
    generator = torch.Generator().manual_seed(seed)
    dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
    loader = DataLoader(
        dataset, batch_size=local.batch_size or len(data), shuffle=True, generator=generator
    )
    names = {n for n, _ in module.named_parameters()}
    config = TrainConfig(
        epochs=epochs,
        lr=local.lr,
        batch_size=local.batch_size,
        momentum=local.momentum,
        weight_decay=local.weight_decay,
        round=round_number,
        seed=seed,
        mu=mu,
        # Copies: the loop may not write into the round's broadcast (the server's model).
        global_params={n: t.clone() for n, t in shared.items() if n in names},
    )
    module.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        returned = call_user(
            loop.function, "the training function", module, loader, config, error=FedforgeError
        )
    module.cpu()  # a loop may have moved it to an accelerator
    metrics = reported_metrics(returned, loop.metrics)
    if TRAIN_LOSS not in metrics:
        metrics[TRAIN_LOSS] = mean_loss(module, data)
    return epochs * local.batches(len(data)), metrics


def reported_metrics(returned: object, declared: tuple[str, ...]) -> dict[str, float]:
    """The metrics a training function returned: names it declared, numbers."""
    if returned is None:
        return {}
    if not isinstance(returned, Mapping):
        raise FedforgeError(
            f"the training function returned {type(returned).__name__}: return a dict of "
            "metrics (e.g. {'train_loss': 0.3}) or None"
        )
    out: dict[str, float] = {}
    for name, value in returned.items():
        if name != TRAIN_LOSS and name not in declared:
            raise FedforgeError(
                f"the training function returned the metric {str(name)[:40]!r}, which the "
                "workload does not declare (Workload.metrics or client.train_metrics)"
            )
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            raise FedforgeError(
                f"the training function's metric {name!r} is not a number"
            ) from None
    return out


@torch.no_grad()
def mean_loss(module: torch.nn.Module, data: ArrayDataset, batch_size: int = 1024) -> float:
    """The trained model's mean cross-entropy on the training data."""
    training = module.training
    module.eval()
    total = 0.0
    for start in range(0, len(data), batch_size):
        x = torch.from_numpy(data.x[start : start + batch_size])
        y = torch.from_numpy(data.y[start : start + batch_size])
        total += float(torch.nn.functional.cross_entropy(module(x), y, reduction="sum"))
    module.train(training)
    return total / max(len(data), 1) if len(data) else math.nan
