"""Attacks and robust aggregators wired into runs: every runtime, the history records whom
each round distrusted and who attacked, and configurations that cannot hold are refused."""

from __future__ import annotations

import numpy as np
import pytest

from fedforge import simulate
from fedforge.aggregate.gather import RobustAggregation
from fedforge.aggregate.kinds import Aggregation, WeightedMean
from fedforge.algorithms.fedavg import FedAvg
from fedforge.attacks.simulated import ModelPoisoning, Omniscient
from fedforge.config import load_config
from fedforge.core.errors import ConfigError
from fedforge.core.records import RecordBatch
from fedforge.data.federated import FederatedDataset
from fedforge.experiment import build_dataset, simulate_config
from fedforge.train.program import LocalSGD
from tests.conftest import small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=1, batch_size=8)
ATTACKERS = frozenset({1, 4})


def run(data: FederatedDataset, aggregation: Aggregation, backend: str = "sequential", **kw):  # type: ignore[no-untyped-def]
    return simulate(
        small_mlp(), data, FedAvg(local=LOCAL), rounds=2, clients_per_round=10,
        aggregation=aggregation, backend=backend, **kw,
    )  # fmt: skip


def test_krum_excludes_scaled_attackers_on_every_runtime(small_federated: FederatedDataset) -> None:
    stage = ModelPoisoning(ATTACKERS, "scaled", scale=-50.0)
    krum = RobustAggregation("multi_krum", byzantine=2, multi=4)
    results = [run(small_federated, krum, b, stages=[stage]) for b in ("sequential", "vectorized")]
    for result in results:
        for record in result.history[1:]:
            assert set(record.clients["excluded"]) >= ATTACKERS
    for name, value in results[0].state.params.items():
        np.testing.assert_allclose(results[1].state.params[name], value, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "rule",
    ["median", "trimmed_mean", "bulyan", "geometric_median", "norm_bound", "centered_clipping"],
)
def test_every_robust_rule_bounds_a_huge_attack(
    small_federated: FederatedDataset, rule: str
) -> None:
    stage = ModelPoisoning(ATTACKERS, "scaled", scale=1e6)
    options = {"norm_bound": {"quantile": 0.5}, "trimmed_mean": {"beta": 0.2}}
    aggregation = RobustAggregation(rule, byzantine=1, **options.get(rule, {}))  # type: ignore[arg-type]
    if rule == "bulyan":
        aggregation = RobustAggregation("bulyan", byzantine=1)
    attacked = run(small_federated, aggregation, stages=[stage])
    plain = run(small_federated, WeightedMean(), stages=[stage])
    norm = max(float(np.abs(v).max()) for v in attacked.state.params.values())
    assert norm < 10  # the robust model stays bounded ...
    assert (
        max(float(np.abs(v).max()) for v in plain.state.params.values()) > 1e3
    )  # ... FedAvg's not


def test_the_poisoning_stage_touches_only_attackers() -> None:
    rows = np.arange(12, dtype=np.float32).reshape(3, 4)
    batch = RecordBatch(np.array([0, 1, 2]), np.array([5, 5, 5]), {"w": rows})
    out = ModelPoisoning(frozenset({1}), "sign_flip", scale=2.0).encode(batch, {}, [0, 0, 0])
    np.testing.assert_array_equal(out.arrays["w"][[0, 2]], rows[[0, 2]])
    np.testing.assert_array_equal(out.arrays["w"][1], -2 * rows[1])
    noise = ModelPoisoning(frozenset({1}), "gaussian", std=3.0).encode(batch, {}, [0, 9, 0])
    again = ModelPoisoning(frozenset({1}), "gaussian", std=3.0).encode(batch, {}, [0, 9, 0])
    np.testing.assert_array_equal(noise.arrays["w"], again.arrays["w"])  # from the task seed


def test_omniscient_attackers_send_alie_computed_from_the_honest_rows() -> None:
    wrapper = Omniscient(WeightedMean(), frozenset({0, 3}), "alie")
    rows = np.random.default_rng(0).normal(size=(6, 5))
    ids = np.arange(6)
    poisoned = wrapper.poison(rows, ids)
    honest = rows[[1, 2, 4, 5]]
    np.testing.assert_array_equal(poisoned[[1, 2, 4, 5]], honest)
    np.testing.assert_allclose(poisoned[0], poisoned[3])
    assert np.all(poisoned[0] < honest.mean(axis=0))  # mean - z * std with z > 0
    ipm = Omniscient(WeightedMean(), frozenset({0}), "ipm", epsilon=0.5).poison(rows, ids)
    np.testing.assert_allclose(ipm[0], -0.5 * rows[1:].mean(axis=0))


def config(*overrides: str):  # type: ignore[no-untyped-def]
    base = ["data.dataset='digits'", "partition.num_clients=10", "server.clients_per_round=10"]
    return load_config(None, [*base, "server.rounds=2", "client.epochs=1", *overrides])


@pytest.mark.parametrize("kind", ["backdoor", "label_flip", "alie", "ipm", "sign_flip"])
def test_configured_attacks_record_their_attackers(kind: str) -> None:
    cfg = config(f"attack.kind='{kind}'", "aggregation.kind='median'")
    result = simulate_config(cfg, build_dataset(cfg))
    last = result.history[-1]
    attackers = {int(c) for c in last.labels["attack.clients"].split(",")}
    assert len(attackers) == 2 and last.labels["attack.kind"] == kind
    if kind == "backdoor":
        assert 0 <= last.metrics["attack.success_rate"] <= 1
        assert "attack.success_rate" in result.history[0].metrics
    again = simulate_config(cfg, build_dataset(cfg))
    assert again.history[-1].labels["attack.clients"] == last.labels["attack.clients"]


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["aggregation.kind='krum'", "aggregation.byzantine=4"], r"n > 2f \+ 2"),
        (["aggregation.kind='bulyan'", "aggregation.byzantine=2"], r"n >= 4f \+ 3"),
        (["aggregation.kind='krum'", "server.sampler='poisson'"], "sampler = 'uniform'"),
        (["aggregation.kind='median'", "aggregation.max_weight=3"], "max_weight"),
        (["aggregation.kind='norm_bound'"], "exactly one of"),
        (["attack.kind='backdoor'", "data.dataset='synthetic'"], "image data"),
    ],
)
def test_configurations_that_cannot_hold_are_refused(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config(*overrides)


@pytest.mark.parametrize("kind", ["label_flip", "sign_flip"])
def test_attackers_lying_about_their_sample_count_are_rejected(
    kind: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Attackers claim 5x their examples for 5x the weight: the server holds every claim to
    the client's data size, so each inflated record is rejected and the round goes on with
    the honest ones."""
    cfg = config(f"attack.kind='{kind}'", "attack.overclaim=5")
    with caplog.at_level("WARNING", logger="fedforge"):
        result = simulate_config(cfg, build_dataset(cfg), backend="vectorized")
    attackers = {int(c) for c in result.history[-1].labels["attack.clients"].split(",")}
    for record in result.history[1:]:
        assert set(record.clients["rejected"]) == attackers  # every client is sampled
        assert record.clients_completed == 10 - len(attackers)
    assert "num_examples" in caplog.text and "outside the allowed range" in caplog.text
    honest = simulate_config(config(f"attack.kind='{kind}'"), build_dataset(cfg))
    assert "rejected" not in honest.history[-1].clients
