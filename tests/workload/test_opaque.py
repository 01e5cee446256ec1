"""The seam's opaque sites: a data function may return any object (not examples), handed
unchanged to the workload's train and evaluate; an evaluate hook replaces the built-in loss
and accuracy in federated and central evaluation. Bad declarations are one line."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from fedforge import Workload, simulate
from fedforge.core.errors import ConfigError
from fedforge.core.rng import Purpose, RngStreams
from fedforge.runtime.exchange import FederatedEvaluation
from fedforge.train.models import seeded
from fedforge.workload.base import Site, TrainConfig


@dataclass(frozen=True)
class Target:
    """A site's private object: a number its model's bias should move to."""

    value: float


SEEN: list[object] = []


def _model() -> nn.Module:
    return nn.Linear(1, 1)


def _train(model: nn.Module, site: Target, config: TrainConfig) -> dict[str, float]:
    SEEN.append(site)
    assert config.global_params["bias"].shape == (1,)
    with torch.no_grad():
        model.bias.add_(config.lr * (site.value - model.bias))  # one step toward the target
    return {"train_loss": abs(site.value - float(model.bias.detach()))}


def _evaluate(model: nn.Module, site: Target) -> dict[str, float]:
    return {"distance": abs(site.value - float(model.bias))}


def _workload(**changes: object) -> Workload:
    fields: dict[str, object] = {
        "model": _model,
        "data": lambda site: Target(float(site.index)),
        "train": _train,
        "test": lambda: Target(0.5),
        "sites": 2,
        "opaque": True,
        "evaluate": _evaluate,
        "evaluate_metrics": ("distance",),
    }
    return Workload(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("backend", ["sequential", "workers"])
def test_site_objects_reach_train_and_evaluate_unchanged(backend: str) -> None:
    SEEN.clear()
    result = simulate(
        _workload(),
        rounds=3,
        clients_per_round=2,
        backend=backend,
        federated_eval=FederatedEvaluation(1.0),
        verbose=0,
    )
    # FedAvg with lr 1 (the server's) of one step of 0.05 toward 0 and toward 1: the bias
    # moves toward 0.5 by a factor 0.95 a round.
    initial = _initial_bias(seed=0)
    expected = 0.5 + (initial - 0.5) * 0.95**3
    assert float(result.model.bias) == pytest.approx(expected, abs=1e-6)
    last = result.history[-1]
    assert last.metrics["test_distance"] == pytest.approx(abs(0.5 - expected), abs=1e-6)
    both = (abs(expected) + abs(1 - expected)) / 2  # each site's distance, weighted equally
    assert last.metrics["fed_eval.distance"] == pytest.approx(both, abs=1e-6)
    assert last.clients_completed == 2
    if backend == "sequential":
        assert SEEN and all(isinstance(s, Target) for s in SEEN)


def _initial_bias(seed: int) -> float:
    """The initial model's bias: ``simulate`` builds it under the run seed's INIT stream."""
    module = seeded(_model, RngStreams(seed).int_seed(Purpose.INIT))
    return float(module.bias.detach())  # type: ignore[operator]


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"train": None}, "give train(model, site_data, config)"),
        ({"evaluate_metrics": ()}, "Workload.evaluate needs evaluate_metrics"),
        ({"evaluate": None}, "names metrics of no evaluate function"),
        ({"evaluate_metrics": ("a b",)}, "is not a plain name"),
        ({"opaque": False, "train_cohort": lambda m, s, c: []}, "train_cohort trains opaque"),
    ],
)
def test_inconsistent_declarations_are_one_line(changes: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _workload(**changes)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_an_evaluate_returning_undeclared_metrics_fails_the_client_with_the_reason() -> None:
    workload = _workload(
        evaluate=lambda model, site: {"distance": 0.0, "secret": 1.0}, test=lambda: None
    )
    result = simulate(
        workload, rounds=1, clients_per_round=2, federated_eval=FederatedEvaluation(1.0), verbose=0
    )
    assert result.history[-1].clients.get("fed_eval_failed") == [0, 1]


def test_federated_evaluation_of_an_opaque_workload_needs_its_evaluate() -> None:
    workload = _workload(evaluate=None, evaluate_metrics=())
    with pytest.raises(ConfigError, match="needs its evaluate"):
        simulate(workload, rounds=1, federated_eval=FederatedEvaluation(1.0), verbose=0)
    unused = Site(0)
    assert workload.data(unused) == Target(0.0)
