"""A cohort of opaque sites trained at once: ``Workload.train_cohort`` (the vectorized
runtime's way to run, say, every RL agent's environments as one tensor program).

The function gets the module holding the global model (for its structure: it is not to be
trained in place), the sites' objects and one :class:`~fedforge.workload.base.TrainConfig`
per site (each with its own seed), and returns, per site, its trained parameters and its
metrics: what ``train`` would have left in the module and returned for that site alone.
Each result then goes through the algorithm's ``finish`` and the client stages exactly as a
``train`` result does (:meth:`~fedforge.runtime.client_app.ClientApp.fit`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from fedforge.core.errors import FedforgeError
from fedforge.train.program import LocalSGD, Tensors
from fedforge.workload.base import CohortFunction, TrainConfig
from fedforge.workload.imports import call_user


@dataclass(frozen=True)
class Trained:
    """One site's result of a cohort: its trained parameters, metrics and local steps."""

    params: Mapping[str, torch.Tensor]
    metrics: dict[str, float]
    steps: int


def train_config(
    local: LocalSGD,
    *,
    epochs: int,
    round_number: int,
    seed: int,
    mu: float,
    shared: Tensors,
    names: set[str],
) -> TrainConfig:
    """The settings a training function gets for one task."""
    return TrainConfig(
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


def run_cohort(
    function: CohortFunction,
    declared: tuple[str, ...],
    module: torch.nn.Module,
    sites: Sequence[object],
    configs: Sequence[TrainConfig],
) -> list[Trained]:
    """The cohort function on ``sites``, its results checked: one per site, every parameter
    of the module in its shape, finite; ``train_loss`` and every declared metric."""
    from fedforge.train.user_loop import TRAIN_LOSS, reported_metrics

    shapes = {n: p.shape for n, p in module.named_parameters()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(configs[0].seed if configs else 0)
        returned = call_user(
            function, "the cohort training function", module, list(sites), list(configs),
            error=FedforgeError,
        )  # fmt: skip
    if not isinstance(returned, Sequence) or len(returned) != len(sites):
        raise FedforgeError(
            f"the cohort training function must return one (params, metrics) pair per site "
            f"({len(sites)})"
        )
    out = []
    for item in returned:
        if not isinstance(item, tuple) or len(item) != 2 or not isinstance(item[0], Mapping):
            raise FedforgeError("the cohort training function returned an item that is not a "
                                "(params, metrics) pair")  # fmt: skip
        params, metrics = item
        if set(params) != set(shapes):
            raise FedforgeError("the cohort training function's parameters are not the model's")
        for name, value in params.items():
            if not isinstance(value, torch.Tensor) or value.shape != shapes[name]:
                raise FedforgeError(f"the cohort training function's {name!r} has a wrong shape")
        checked = reported_metrics(metrics, declared)
        missing = [n for n in (TRAIN_LOSS, *declared) if n not in checked]
        if missing:
            raise FedforgeError(f"the cohort training function returned no {missing[0]!r}")
        out.append(Trained({n: t.detach().cpu() for n, t in params.items()}, checked, 0))
    return out
