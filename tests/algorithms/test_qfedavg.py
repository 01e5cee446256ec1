"""q-FedAvg (q-FFL): hand-computed client values, and q = 0 is uniform FedAvg."""

import numpy as np
import pytest
import torch

from fedforge.algorithms.fedavg import FedAvg
from fedforge.algorithms.qfedavg import H, QFedAvg
from fedforge.runtime.simulation import simulate
from fedforge.train.program import INITIAL_LOSS, LocalSGD
from tests.conftest import small_mlp

LOCAL = LocalSGD(lr=0.1, epochs=2, batch_size=7)


def test_client_values_match_the_paper() -> None:
    """Delta_k = F^q L (w - w_k), h_k = q F^(q-1) ||L (w - w_k)||^2 + L F^q, L = 1/lr."""
    algo = QFedAvg(local=LocalSGD(lr=0.5), q=2.0)
    delta = torch.tensor([0.1, -0.2], dtype=torch.float64)  # w_k - w
    loss = 1.5
    own = {INITIAL_LOSS: torch.tensor(loss, dtype=torch.float64)}
    arrays, state = algo.finish({"w": delta}, {}, own, torch.tensor(4.0))
    dw = 2.0 * -delta.numpy()  # L (w - w_k), L = 2
    np.testing.assert_allclose(arrays["w"].numpy(), loss**2 * dw)
    h = 2.0 * loss * float(dw @ dw) + 2.0 * loss**2
    np.testing.assert_allclose(arrays[H].numpy(), [h], rtol=1e-6)
    assert state == {}


@pytest.mark.parametrize("backend", ["sequential", "vectorized"])
def test_q_zero_equals_uniform_fedavg(small_federated, backend: str) -> None:  # type: ignore[no-untyped-def]
    kwargs = dict(rounds=2, clients_per_round=6, seed=3, backend=backend)
    avg = simulate(small_mlp(), small_federated, FedAvg(local=LOCAL, weighting="uniform"), **kwargs)  # type: ignore[arg-type]
    q0 = simulate(small_mlp(), small_federated, QFedAvg(local=LOCAL, q=0.0), **kwargs)  # type: ignore[arg-type]
    for name, value in avg.state.params.items():
        np.testing.assert_allclose(q0.state.params[name], value, rtol=1e-5, atol=1e-6)


def test_larger_q_weighs_the_worse_client_more() -> None:
    """Two clients with the same update size: the one with the larger loss moves the model
    more as q grows (the fairness reweighting)."""

    def step(q: float) -> np.ndarray:
        algo = QFedAvg(local=LocalSGD(lr=0.1), q=q)
        totals, hs = [], []
        for loss, d in ((0.5, [1.0, 0.0]), (2.0, [0.0, 1.0])):
            own = {INITIAL_LOSS: torch.tensor(loss, dtype=torch.float64)}
            arrays, _ = algo.finish({"w": torch.tensor(d)}, {}, own, torch.tensor(1.0))
            totals.append(arrays["w"].numpy())
            hs.append(float(arrays[H][0]))
        return -np.sum(totals, axis=0) / np.sum(hs)

    zero, five = step(0.0), step(5.0)
    np.testing.assert_allclose(zero, [0.5, 0.5])  # the plain mean of the two updates
    assert five[1] / five[0] > 10 * zero[1] / zero[0]
