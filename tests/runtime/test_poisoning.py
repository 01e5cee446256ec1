"""One finite poisoned update must not wreck the model, and a run that cannot make progress
must stop with the reason (the driver is the same in simulation and deployment)."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from fedforge.aggregate.guard import OutlierBound, aggregate_problem, record_norms
from fedforge.aggregate.kinds import Aggregate
from fedforge.algorithms.base import RoundContext, ServerState
from fedforge.algorithms.fedavg import FedAvg
from fedforge.config.run import RunConfig
from fedforge.core.errors import FedforgeError
from fedforge.core.records import RecordBatch
from fedforge.data.datasets import load_digits
from fedforge.data.federated import FederatedDataset
from fedforge.experiment import build_dataset, simulate_config
from fedforge.runtime.simulation import simulate
from tests.conftest import small_mlp

DIGITS_MLP = 64 * 32 + 32 + 32 * 10 + 10  # parameters of the digits MLP below


def _config(**aggregation: object) -> RunConfig:
    """Four digits sites, the one at index 2 attacking with a Gaussian update of norm 1e37
    (finite in float32)."""
    return RunConfig.model_validate(
        {
            "seed": 3,
            "data": {"dataset": "digits"},
            "partition": {"scheme": "dirichlet", "num_clients": 4, "alpha": 1.0},
            "model": {"name": "mlp", "hidden": [32]},
            "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
            "server": {"rounds": 2, "clients_per_round": 4},
            "aggregation": aggregation,
            "attack": {"kind": "gaussian", "fraction": 0.25, "std": 1e37 / math.sqrt(DIGITS_MLP)},
        }
    )


def test_a_huge_finite_update_is_refused_and_the_round_retried_without_it() -> None:
    cfg = _config(outlier_ratio=10.0)
    result = simulate_config(cfg, build_dataset(cfg))
    attacker = int(result.history[1].labels["attack.clients"].split(",")[0])
    assert [r.round for r in result.history] == [0, 1, 2]
    for record in result.history[1:]:
        assert record.clients["refused"] == [attacker]  # left out of the retry
        assert record.clients_completed == 3
    # The honest sites' model trains on (the poisoned one stays at 0.10, the test below).
    assert result.history[-1].test_accuracy > 0.3 > result.history[0].test_accuracy


def test_unguarded_the_poisoned_model_stops_the_run_with_the_reason() -> None:
    """Without the bound, round 1 applies the poison; in round 2 every site's record is NaN
    and rejected: the run cannot make progress and says why (it used to finish at 0.10)."""
    cfg = _config(outlier_ratio=0.0, max_refused=1)
    with pytest.raises(FedforgeError, match=r"round 2: .*every record was rejected.*NaN"):
        simulate_config(cfg, build_dataset(cfg))


def test_honest_sites_of_very_different_sizes_are_never_refused() -> None:
    """1000 examples against 80 and 80: the large site's update is ten times the others'
    norm, but not per local step."""
    train, test = load_digits()
    sizes = [1000, 80, 80]
    starts = np.cumsum([0, *sizes])
    part = [np.arange(starts[i], starts[i + 1]) for i in range(3)]
    data = FederatedDataset(train, test, part)
    cfg = RunConfig.model_validate(
        {
            "seed": 3,
            "data": {"dataset": "digits"},
            "partition": {"num_clients": 3},
            "model": {"name": "mlp", "hidden": [32]},
            "client": {"epochs": 1, "batch_size": 16, "lr": 0.1},
            "server": {"rounds": 3, "clients_per_round": 3},
            "aggregation": {"outlier_ratio": 10.0},
        }
    )
    result = simulate_config(cfg, data)
    assert all("refused" not in r.clients for r in result.history)
    assert all(r.clients_completed == 3 for r in result.history[1:])


class Exploding(FedAvg):
    """A server step that overflows: its new model is not finite."""

    def server_update(
        self, state: ServerState, aggregate: Aggregate, context: RoundContext
    ) -> ServerState:
        new = super().server_update(state, aggregate, context)
        return replace(new, params={k: v * np.float32(np.inf) for k, v in new.params.items()})


def test_a_non_finite_new_model_is_refused_and_the_run_stops(small_federated) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(FedforgeError, match=r"refused in 3 attempts.*new model's .* not finite"):
        simulate(small_mlp(), small_federated, Exploding(), rounds=1, max_refused=2)


def test_norms_and_aggregate_checks_survive_overflow() -> None:
    big = np.full((2, 1000), 3e38, np.float32)  # finite; its square overflows
    norms = record_norms(RecordBatch(np.arange(2), np.ones(2, np.int64), {"w": big}))
    assert np.allclose(norms, 3e38 * math.sqrt(1000), rtol=1e-6)
    assert "not finite" in (aggregate_problem({"w": np.array([np.inf], np.float32)}) or "")
    assert "exceeds" in (aggregate_problem({"w": np.array([3.0, 4.0])}, bound=4.0) or "")
    assert aggregate_problem({"w": np.array([3.0, 4.0])}, bound=5.0) is None
    # The low median is an honest value while offenders are a minority, per local step.
    bound = OutlierBound(10.0)
    norms_of = {0: 1.0, 1: 1.2, 2: 12.0, 3: 50.0}
    steps = {0: 1, 1: 1, 2: 10, 3: 1}  # client 2 trained ten times as long: not an outlier
    assert list(bound.offenders(norms_of, steps)) == [3]
    assert list(bound.offenders({0: 1.0, 1: 1e37}, {0: 1, 1: 1})) == [1]
    assert bound.offenders({0: 0.0, 1: 0.5}, {0: 1, 1: 1}) == {}  # zeros are no median
    assert bound.offenders({0: 0.0, 1: 0.0}, {0: 1, 1: 1}) == {}
