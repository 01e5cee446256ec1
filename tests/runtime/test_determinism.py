"""Client randomness (dropout) comes from the client's own stream, whatever process runs it."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedforge
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.simulation import SimulationResult

ALGORITHM = fedforge.FedAvg(local=fedforge.LocalSGD(lr=0.1, epochs=2, batch_size=8))


def dropout_mlp(p: float = 0.5) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(8, 32),
        torch.nn.ReLU(),
        torch.nn.Dropout(p),
        torch.nn.Linear(32, 3),
    )


def run(data: FederatedDataset, backend: str, p: float = 0.5) -> SimulationResult:
    model = dropout_mlp(p)
    # Scramble torch's global RNG (inherited by forked workers): results must not depend on it.
    torch.manual_seed(int(np.random.default_rng().integers(1 << 31)))
    return fedforge.simulate(
        model,
        data,
        ALGORITHM,
        rounds=2,
        clients_per_round=4,
        seed=0,
        backend=backend,  # type: ignore[arg-type]
        options=fedforge.BackendOptions(num_workers=2),
    )


def assert_identical(a: SimulationResult, b: SimulationResult) -> None:
    assert sorted(a.state.params) == sorted(b.state.params)
    for name in a.state.params:
        np.testing.assert_array_equal(a.state.params[name], b.state.params[name])


def assert_close(a: SimulationResult, b: SimulationResult) -> None:
    for name in a.state.params:
        np.testing.assert_allclose(a.state.params[name], b.state.params[name], atol=1e-5)


@pytest.mark.parametrize("backend", ["workers", "auto"])
def test_dropout_is_reproducible_run_to_run_and_matches_sequential(
    small_federated: FederatedDataset, backend: str
) -> None:
    first = run(small_federated, backend)
    second = run(small_federated, backend)
    assert first.backend == second.backend == "workers"  # auto cannot vectorize dropout
    assert_identical(first, second)
    assert_close(first, run(small_federated, "sequential"))


def test_dropout_is_active_in_local_training(small_federated: FederatedDataset) -> None:
    # Guards the test above: without dropout the same run gives a different model.
    a, b = run(small_federated, "sequential"), run(small_federated, "sequential", p=0.0)
    assert any(not np.array_equal(a.state.params[n], b.state.params[n]) for n in a.state.params)


def _linear() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def test_a_model_factory_is_initialized_from_the_run_seed(
    small_federated: FederatedDataset,
) -> None:
    def run_with(seed: int) -> SimulationResult:
        torch.manual_seed(int(np.random.default_rng().integers(1 << 31)))  # scrambled
        return fedforge.simulate(
            _linear, small_federated, ALGORITHM, rounds=1, clients_per_round=2, seed=seed
        )

    first, again, other = run_with(3), run_with(3), run_with(4)
    assert_identical(first, again)
    assert first.history[0].test_loss == again.history[0].test_loss  # same initial model
    assert first.history[0].test_loss != other.history[0].test_loss
