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
from fedforge.train.evaluate import Evaluation
from fedforge.train.program import LocalProgram, LocalSGD, Proximal, Tensors
from fedforge.train.site_cohort import train_config
from fedforge.workload.base import CohortFunction, EvaluateFunction, TrainFunction, Workload
from fedforge.workload.imports import call_user

TRAIN_LOSS = "train_loss"
MAX_METRICS = 64


@dataclass(frozen=True)
class UserLoop:
    """A training function and what it declares: the metrics it may report beside
    ``train_loss``, and whether it adds the proximal term when ``config.mu`` > 0; ``opaque``
    that it trains on a site's object rather than a loader."""

    function: TrainFunction
    metrics: tuple[str, ...] = ()
    proximal: bool = False
    opaque: bool = False
    cohort: CohortFunction | None = None  # the same for many opaque sites at once

    @classmethod
    def of(cls, workload: Workload) -> UserLoop | None:
        """The workload's training function, if it has one."""
        if workload.train is None:
            return None
        return cls(
            workload.train,
            workload.metrics,
            workload.proximal,
            workload.opaque,
            workload.train_cohort,
        )

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
    site: object | None = None,
) -> tuple[int, dict[str, float]]:
    """Run the training function on ``module``; (steps, metrics with ``train_loss``). Steps
    are the configured local SGD steps (the loop's own are unknown); an opaque ``site`` is
    handed to the function instead of a loader (its steps: the epochs)."""
    if loop.opaque != (site is not None):
        raise FedforgeError("an opaque workload's training function needs its site's object")
    source: object = site
    if site is None:
        generator = torch.Generator().manual_seed(seed)
        dataset = TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y))
        source = DataLoader(
            dataset, batch_size=local.batch_size or len(data), shuffle=True, generator=generator
        )
    names = {n for n, _ in module.named_parameters()}
    config = train_config(
        local, epochs=epochs, round_number=round_number, seed=seed, mu=mu, shared=shared,
        names=names,
    )  # fmt: skip
    module.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        returned = call_user(
            loop.function, "the training function", module, source, config, error=FedforgeError
        )
    module.cpu()  # a loop may have moved it to an accelerator
    metrics = reported_metrics(returned, loop.metrics)
    if site is not None:
        missing = [n for n in (TRAIN_LOSS, *loop.metrics) if n not in metrics]
        if missing:
            raise FedforgeError(
                f"the training function returned no {missing[0]!r}: an opaque workload's "
                "function reports train_loss and every metric it declares"
            )
        return epochs, metrics
    if TRAIN_LOSS not in metrics:
        metrics[TRAIN_LOSS] = mean_loss(module, data)
    return epochs * local.batches(len(data)), metrics


@dataclass(frozen=True)
class SiteEvaluation:
    """A workload's ``evaluate(model, site_data)`` and the metric names it returns."""

    function: EvaluateFunction
    metrics: tuple[str, ...]

    @classmethod
    def of(cls, workload: Workload) -> SiteEvaluation | None:
        if workload.evaluate is None:
            return None
        return cls(workload.evaluate, workload.evaluate_metrics)


def run_evaluate(
    evaluation: SiteEvaluation, module: torch.nn.Module, site_data: object
) -> dict[str, float]:
    """The workload's evaluation function on ``site_data``: every declared metric, a number."""
    training = module.training
    module.eval()
    try:
        with torch.no_grad():
            returned = call_user(
                evaluation.function, "the evaluate function", module, site_data, error=FedforgeError
            )
    finally:
        module.train(training)
    if not isinstance(returned, Mapping):
        raise FedforgeError(
            f"the evaluate function returned {type(returned).__name__}: return a dict of metrics"
        )
    out: dict[str, float] = {}
    for name in evaluation.metrics:
        if name not in returned:
            raise FedforgeError(f"the evaluate function returned no {name!r}")
        try:
            out[name] = float(returned[name])
        except (TypeError, ValueError):
            raise FedforgeError(
                f"the evaluate function's metric {name!r} is not a number"
            ) from None
    extra = set(returned) - set(out)
    if extra:
        raise FedforgeError(
            f"the evaluate function returned {str(sorted(map(str, extra))[0])[:40]!r}, which "
            "Workload.evaluate_metrics does not declare"
        )
    return out


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


def central_evaluation(
    evaluation: SiteEvaluation, module: torch.nn.Module, test: object
) -> Evaluation:
    """The workload's evaluation function on the central test data, as ``test_<name>``
    metrics (no built-in loss or accuracy)."""
    scores = run_evaluate(evaluation, module, test)
    return Evaluation(math.nan, math.nan, {f"test_{n}": v for n, v in scores.items()})
