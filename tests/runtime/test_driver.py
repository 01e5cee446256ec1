"""The driver's round: records, timing split, samplers, federated evaluation, retries."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedforge.aggregate.gather import CoordinateMedian
from fedforge.aggregate.kinds import WeightedMean
from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.errors import ConfigError, FedforgeError
from fedforge.core.params import spec_of
from fedforge.core.rng import RngStreams
from fedforge.data.datasets import ArrayDataset
from fedforge.data.federated import FederatedDataset
from fedforge.report.history import History, RoundRecord
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.client_state import MemoryStateStore
from fedforge.runtime.driver import Driver, FederatedEvaluation
from fedforge.runtime.sampling import PoissonSampler, UniformSampler
from fedforge.runtime.sequential import SequentialTransport
from fedforge.runtime.simulation import simulate
from fedforge.train.program import LocalSGD
from fedforge.train.torch_model import TorchModel
from tests.conftest import make_blobs, small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=1, batch_size=8)


def test_history_starts_with_round_zero_and_splits_time(small_federated) -> None:  # type: ignore[no-untyped-def]
    result = simulate(small_mlp(), small_federated, FedAvg(local=LOCAL), rounds=3)
    h = result.history
    assert [r.round for r in h] == [0, 1, 2, 3]
    assert h[0].clients_sampled == 0 and np.isfinite(h[0].test_accuracy)
    for r in h[1:]:
        parts = r.train_seconds + r.aggregate_seconds + r.eval_seconds
        assert r.train_seconds > 0 and r.aggregate_seconds > 0 and r.eval_seconds > 0
        assert parts <= r.wall_seconds * 1.01
        assert r.bytes_up == r.clients_completed * sum(
            a.nbytes for a in result.state.params.values()
        )


def test_history_round_trips_without_loss_and_refuses_unknown_fields(tmp_path: Path) -> None:
    record = RoundRecord(
        round=2,
        test_accuracy=0.5,
        test_loss=1.0,
        train_loss=0.25,
        wall_seconds=1.5,
        metrics={"clip.clipped": 3.0, "fed_eval.accuracy": 0.4},
        clients={"excluded": [4, 7]},
    )
    History([record]).save(tmp_path / "h.json")
    assert History.load(tmp_path / "h.json") == [record]
    rows = json.loads((tmp_path / "h.json").read_text())
    rows[0]["surprise"] = 1
    (tmp_path / "h.json").write_text(json.dumps(rows))
    with pytest.raises(FedforgeError, match="surprise"):
        History.load(tmp_path / "h.json")


def test_samplers_uniform_poisson_and_custom(small_federated) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    picked = UniformSampler(3)(list(range(10)), rng)
    assert len(set(picked)) == 3 and picked == sorted(picked)
    assert UniformSampler(30)(list(range(5)), rng) == [0, 1, 2, 3, 4]  # fewer available
    sizes = [
        len(PoissonSampler(0.3)(list(range(100)), np.random.default_rng(s))) for s in range(20)
    ]
    assert 20 < np.mean(sizes) < 40 and len(set(sizes)) > 3
    poisson = simulate(small_mlp(), small_federated, rounds=4, sampler=PoissonSampler(0.5), seed=1)
    assert len({r.clients_sampled for r in poisson.history[1:]}) > 1

    def evens(population, rng):  # type: ignore[no-untyped-def]
        return [c for c in population if c % 2 == 0]

    custom = simulate(small_mlp(), small_federated, rounds=1, sampler=evens)
    assert custom.history[1].clients_sampled == 5


def test_federated_evaluation_is_a_second_exchange(small_federated) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(ConfigError, match="held-out"):
        simulate(small_mlp(), small_federated, federated_eval=FederatedEvaluation(0.5))
    data = small_federated.with_holdout(0.3, np.random.default_rng(0))
    assert all(len(h) >= 1 for h in data.holdout)  # type: ignore[union-attr]
    assert sum(data.client_size(c) + data.holdout_size(c) for c in range(10)) == 300
    result = simulate(
        small_mlp(), data, rounds=2, clients_per_round=4, federated_eval=FederatedEvaluation(0.5)
    )
    r = result.history[2]
    assert r.metrics["fed_eval.clients"] == 5
    assert 0 <= r.metrics["fed_eval.accuracy"] <= 1 and r.metrics["fed_eval.loss"] > 0
    # Bytes: the fit exchange sends the model to 4 clients, the evaluation to 5 more.
    model_bytes = sum(a.nbytes for a in result.state.params.values())
    assert r.bytes_down == 9 * model_bytes
    every_other = simulate(
        small_mlp(),
        data,
        rounds=2,
        clients_per_round=4,
        federated_eval=FederatedEvaluation(1.0, every=2),
    )
    assert "fed_eval.accuracy" not in every_other.history[1].metrics
    assert every_other.history[2].metrics["fed_eval.clients"] == 10


def test_federated_evaluation_asks_only_clients_with_held_out_data() -> None:
    """A client with one example holds none out: it is never asked to evaluate (it would
    fail), and the fraction is of the clients that can."""
    train, test = make_blobs(61, seed=0), make_blobs(30, seed=1)
    data = FederatedDataset(
        train, test, [np.arange(20), np.arange(20, 40), np.arange(40, 60), np.array([60])]
    )
    data = data.with_holdout(0.25, np.random.default_rng(0))
    assert [data.holdout_size(c) for c in range(4)] == [5, 5, 5, 0]
    result = simulate(
        small_mlp(), data, rounds=2, clients_per_round=4, federated_eval=FederatedEvaluation(1.0)
    )
    for record in result.history[1:]:
        assert record.metrics["fed_eval.clients"] == 3
        assert "fed_eval_failed" not in record.clients


def test_simulate_restores_torch_threads(small_federated) -> None:  # type: ignore[no-untyped-def]
    before = torch.get_num_threads()
    simulate(small_mlp(), small_federated, rounds=1, threads=before + 1)
    assert torch.get_num_threads() == before


def test_median_and_weight_cap_run_and_report(small_federated) -> None:  # type: ignore[no-untyped-def]
    median = simulate(
        small_mlp(), small_federated, FedAvg(local=LOCAL), rounds=3, aggregation=CoordinateMedian()
    )
    assert median.history[3].train_loss < median.history[1].train_loss
    capped = simulate(
        small_mlp(), small_federated, rounds=1, clients_per_round=10, aggregation=WeightedMean(20)
    )
    big = [c for c in range(10) if small_federated.client_size(c) > 20]
    assert big and capped.history[1].clients["downweighted"] == big


def failing_data() -> FederatedDataset:
    """Clients 0 and 1 hold labels the model cannot have (their training raises)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    y = rng.integers(0, 3, 40)
    y[:20] = 99
    parts = [np.arange(i * 10, (i + 1) * 10) for i in range(4)]
    return FederatedDataset(ArrayDataset(x, y), ArrayDataset(x[20:], y[20:]), parts)


def make_driver(
    data: FederatedDataset,
    per_round: int,
    algorithm: FedAvg | None = None,
    store: MemoryStateStore | None = None,
) -> tuple[Driver, object]:
    model = small_mlp()
    algorithm = algorithm or FedAvg(local=LOCAL)
    app = ClientApp(algorithm, model)
    store = store or MemoryStateStore()
    params = TorchModel(model).get_params()
    driver = Driver(
        algorithm=algorithm,
        transport=SequentialTransport(app, data, store),
        sampler=UniformSampler(per_round),
        streams=RngStreams(0),
        model_spec=spec_of(params),
        trainable=app.trainable,
        population=lambda: range(data.num_clients),
        population_size=lambda: data.num_clients,
        example_cap=lambda cid, stage: data.client_size(cid),
        client_states=store,
    )
    return driver, algorithm.init(params)


def test_failing_clients_are_recorded_and_short_rounds_retried() -> None:
    data = failing_data()
    driver, state = make_driver(data, per_round=2)
    history = History()
    final = driver.run(state, 4, history, min_completed=1, max_retries=10)  # type: ignore[arg-type]
    assert final.round == 4
    for record in history[1:]:
        assert record.clients_completed >= 1
        assert set(record.clients.get("failed", [])) <= {0, 1}
        assert record.clients_failed == len(record.clients.get("failed", []))
    driver_all_bad, state = make_driver(
        FederatedDataset(data.train, data.test, data.partition[:2]), per_round=2
    )
    with pytest.raises(FedforgeError, match="fewer than 1 accepted"):
        driver_all_bad.run(state, 1, History(), min_completed=1, max_retries=1)  # type: ignore[arg-type]


def test_client_state_moves_only_with_the_aggregate() -> None:
    """A client whose record is not used keeps its previous state (simulation)."""
    from fedforge.algorithms.scaffold import Scaffold

    store = MemoryStateStore()
    driver, state = make_driver(failing_data(), 4, Scaffold(local=LOCAL), store)
    driver.run(state, 2, History())  # type: ignore[arg-type]
    assert store.get(0, 3) is None and store.get(1, 3) is None  # failed: nothing kept
    assert store.get(2, 3) is not None and store.get(3, 3) is not None


def test_scaffold_with_update_stages_is_refused(small_federated) -> None:  # type: ignore[no-untyped-def]
    from fedforge.algorithms.scaffold import Scaffold
    from fedforge.stages.clip import FixedClip

    with pytest.raises(ConfigError, match="Scaffold cannot run with update stages"):
        simulate(small_mlp(), small_federated, Scaffold(), stages=[FixedClip(1.0)])


def test_normalized_records_refuse_aggregations_that_break_them(small_federated) -> None:  # type: ignore[no-untyped-def]
    """SCAFFOLD needs every accepted control delta added (the mean); FedNova and q-FedAvg need
    their normalizer combined with the update it normalizes (whole records)."""
    from fedforge.aggregate.gather import RobustAggregation
    from fedforge.algorithms.fednova import FedNova
    from fedforge.algorithms.qfedavg import QFedAvg
    from fedforge.algorithms.scaffold import Scaffold

    refused = [
        (Scaffold(local=LOCAL), CoordinateMedian(), "control variate"),
        (Scaffold(local=LOCAL), RobustAggregation("krum", byzantine=1), "control variate"),
        (Scaffold(local=LOCAL), RobustAggregation("geometric_median"), "control variate"),
        (FedNova(local=LOCAL), CoordinateMedian(), "normalizer"),
        (QFedAvg(local=LOCAL), RobustAggregation("norm_bound", max_norm=1.0), "normalizer"),
    ]
    for algorithm, aggregation, reason in refused:
        with pytest.raises(ConfigError, match=reason):
            simulate(small_mlp(), small_federated, algorithm, rounds=1, aggregation=aggregation)
    krum = RobustAggregation("multi_krum", byzantine=1, multi=3)
    result = simulate(
        small_mlp(), small_federated, FedNova(local=LOCAL), rounds=1, aggregation=krum
    )
    assert result.history[-1].clients_completed == 10


def test_batchnorm_models_train_on_sequential_and_workers(small_federated) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    bn = torch.nn.Sequential(
        torch.nn.Linear(8, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(), torch.nn.Linear(16, 3)
    )
    full_batch = LocalSGD(lr=0.1, epochs=3, batch_size=0)  # no batch of one for batch norm
    runs = [
        simulate(bn, small_federated, FedAvg(local=full_batch), rounds=3, backend=b)
        for b in ("sequential", "workers")
    ]
    for run in runs:
        assert all(r.clients_failed == 0 for r in run.history[1:])
        assert run.history[3].train_loss < run.history[1].train_loss
    for name in runs[0].state.params:  # running statistics are averaged like weights
        np.testing.assert_allclose(
            runs[0].state.params[name], runs[1].state.params[name], atol=1e-5
        )
