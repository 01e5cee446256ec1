"""Algorithms x server optimizers x runtimes: every combination trains, and every runtime
matches the sequential reference."""

from __future__ import annotations

import numpy as np
import pytest

import fedforge
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.simulation import SimulationResult
from tests.conftest import small_mlp

LOCAL = fedforge.LocalSGD(lr=0.1, epochs=1, batch_size=8, momentum=0.5)
ROUNDS, PER_ROUND, SEED = 3, 6, 7

ALGORITHMS = {
    "fedavg": lambda opt: fedforge.FedAvg(local=LOCAL, server_optimizer=opt),
    "fedprox": lambda opt: fedforge.FedProx(local=LOCAL, server_optimizer=opt, mu=0.1),
    "scaffold": lambda opt: fedforge.Scaffold(local=LOCAL, server_optimizer=opt),
}
OPTIMIZERS = {
    "sgd": lambda: fedforge.ServerSGD(),
    "adam": lambda: fedforge.FedAdam(lr=0.01),
    "yogi": lambda: fedforge.FedYogi(lr=0.01),
}

_reference: dict[tuple[str, str], SimulationResult] = {}  # sequential runs, computed once


def run(data: FederatedDataset, algorithm: str, optimizer: str, backend: str) -> SimulationResult:
    return fedforge.simulate(
        small_mlp(),
        data,
        ALGORITHMS[algorithm](OPTIMIZERS[optimizer]()),
        rounds=ROUNDS,
        clients_per_round=PER_ROUND,
        seed=SEED,
        backend=backend,  # type: ignore[arg-type]
    )


def reference(data: FederatedDataset, algorithm: str, optimizer: str) -> SimulationResult:
    key = (algorithm, optimizer)
    if key not in _reference:
        _reference[key] = run(data, algorithm, optimizer, "sequential")
    return _reference[key]


@pytest.mark.parametrize("backend", ["sequential", "vectorized", "workers"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("algorithm", list(ALGORITHMS))
def test_every_combination_trains_and_matches_sequential(
    small_federated: FederatedDataset, algorithm: str, optimizer: str, backend: str
) -> None:
    seq = reference(small_federated, algorithm, optimizer)
    got = seq if backend == "sequential" else run(small_federated, algorithm, optimizer, backend)
    assert got.backend == backend
    rounds = got.history[1:]
    assert len(rounds) == ROUNDS
    assert all(r.clients_completed == PER_ROUND for r in rounds)
    assert rounds[0].train_loss > rounds[-1].train_loss  # it learns
    for name, value in seq.state.params.items():
        np.testing.assert_allclose(got.state.params[name], value, atol=1e-5)
    for name, value in seq.state.extras.items():  # SCAFFOLD's server control variate
        np.testing.assert_allclose(got.state.extras[name], value, atol=1e-5)
    for a, b in zip(seq.history, got.history, strict=True):
        assert (a.round, a.clients_sampled, a.clients_completed) == (
            b.round,
            b.clients_sampled,
            b.clients_completed,
        )
        assert (a.clients_failed, a.clients_rejected, a.clients) == (
            b.clients_failed,
            b.clients_rejected,
            b.clients,
        )
        assert b.train_loss == pytest.approx(a.train_loss, rel=1e-4, nan_ok=True)
        assert b.test_loss == pytest.approx(a.test_loss, rel=1e-4)
        assert b.test_accuracy == pytest.approx(a.test_accuracy, abs=1e-9)
