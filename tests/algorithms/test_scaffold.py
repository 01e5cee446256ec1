"""SCAFFOLD (option II) on a quadratic toy problem, against a hand derivation."""

import numpy as np
import pytest
import torch

from fedforge.aggregate.kinds import Aggregate
from fedforge.algorithms.base import RoundContext
from fedforge.algorithms.scaffold import CONTROL, Scaffold
from fedforge.train.program import LocalSGD


def quadratic_client(
    x0: np.ndarray, a: float, b: np.ndarray, c: np.ndarray, c_i: np.ndarray, lr: float, steps: int
) -> np.ndarray:
    """Hand derivation: f_i(y) = a/2 ||y - b||^2, grad = a (y - b); corrected SGD
    y <- y - lr (a (y - b) - c_i + c)."""
    y = x0.copy()
    for _ in range(steps):
        y = y - lr * (a * (y - b) - c_i + c)
    return y


def test_client_update_and_controls_match_hand_derivation() -> None:
    """Drive the client program through LocalProgram.apply with the quadratic's gradient."""
    lr, steps, a = 0.1, 5, 2.0
    x0 = np.array([1.0, -1.0], np.float64)
    b = np.array([0.5, 2.0])
    c = np.array([0.2, -0.1])
    c_i = np.array([-0.3, 0.4])
    algo = Scaffold(local=LocalSGD(lr=lr))
    program = algo.program()
    shared = {"w": torch.tensor(x0), CONTROL + "w": torch.tensor(c)}
    own = {CONTROL + "w": torch.tensor(c_i)}
    params = {"w": torch.tensor(x0)}
    state = program.init(params)
    for _ in range(steps):
        grads = {"w": a * (params["w"] - torch.tensor(b))}
        params, state = program.apply(params, grads, state, shared, own)
    y = quadratic_client(x0, a, b, c, c_i, lr, steps)
    np.testing.assert_allclose(params["w"].numpy(), y, rtol=1e-12)

    delta = {"w": params["w"] - shared["w"]}
    arrays, new_own = algo.finish(delta, shared, own, torch.tensor(float(steps)))
    c_plus = c_i - c + (x0 - y) / (steps * lr)  # option II
    np.testing.assert_allclose(new_own[CONTROL + "w"].numpy(), c_plus, rtol=1e-12)
    np.testing.assert_allclose(arrays["w"].numpy(), y - x0, rtol=1e-12)
    np.testing.assert_allclose(arrays[CONTROL + "w"].numpy(), c_plus - c_i, rtol=1e-12)


def test_server_update_moves_model_and_control_variate() -> None:
    algo = Scaffold()
    state = algo.init({"w": np.array([1.0, 2.0], np.float32)})
    assert np.all(state.extras[CONTROL + "w"] == 0)
    aggregate = Aggregate(
        arrays={
            "w": np.array([0.5, -1.0], np.float32),
            CONTROL + "w": np.array([0.4, 0.8], np.float32),
        },
        scalars={},
        count=2,
        total_weight=2.0,
    )
    new = algo.server_update(state, aggregate, RoundContext(1, population_size=10, sampled=2))
    np.testing.assert_allclose(new.params["w"], [1.5, 1.0])
    # c += |S| / N * mean(dc) = 2/10 * [0.4, 0.8]
    np.testing.assert_allclose(new.extras[CONTROL + "w"], [0.08, 0.16], rtol=1e-6)


def test_scaffold_weights_clients_uniformly() -> None:
    assert Scaffold().weighting == "uniform"
    assert Scaffold().init_client_state({"w": np.zeros(3, np.float32)})[CONTROL + "w"].shape == (3,)


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_scaffold_runs_with_client_state(backend: str) -> None:
    """Smoke: SCAFFOLD runs with client state and its control variate becomes non-zero."""
    from fedforge.data import partition
    from fedforge.data.federated import FederatedDataset
    from fedforge.runtime.simulation import simulate
    from tests.conftest import make_blobs, small_mlp

    train = make_blobs(200, seed=0)
    parts = partition.shards(train.y, 8, 1, np.random.default_rng(0))
    data = FederatedDataset(train, make_blobs(60, seed=0), parts)
    result = simulate(
        small_mlp(),
        data,
        Scaffold(local=LocalSGD(lr=0.05, epochs=2, batch_size=8)),
        rounds=3,
        clients_per_round=4,
        seed=0,
        backend=backend,  # type: ignore[arg-type]
    )
    assert any(np.abs(v).sum() > 0 for v in result.state.extras.values())
    assert result.history[-1].train_loss < result.history[1].train_loss


def test_scaffold_runs_on_a_model_with_a_float_buffer() -> None:
    """Control variates cover trainable parameters only; buffers pass through."""
    from fedforge.data import partition
    from fedforge.data.federated import FederatedDataset
    from fedforge.runtime.simulation import simulate
    from tests.conftest import make_blobs

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(8, 3)
            self.register_buffer("scale", torch.ones(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) * self.scale

    train = make_blobs(120, seed=0)
    parts = partition.iid(len(train), 4, np.random.default_rng(0))
    data = FederatedDataset(train, make_blobs(40, seed=0), parts)
    result = simulate(
        Scaled(), data, Scaffold(local=LocalSGD(lr=0.1)), rounds=2, clients_per_round=4
    )
    assert result.history[2].clients_completed == 4
    assert np.abs(result.state.extras[CONTROL + "fc.weight"]).sum() > 0
