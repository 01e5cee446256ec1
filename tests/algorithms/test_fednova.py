"""FedNova: normalized averaging, against hand-computed values and FedAvg."""

import numpy as np
import torch

from fedforge.aggregate.kinds import StreamingMean
from fedforge.algorithms.base import RoundContext
from fedforge.algorithms.fedavg import FedAvg
from fedforge.algorithms.fednova import STEPS, FedNova, step_norm
from fedforge.core.records import RecordBatch
from fedforge.data import partition
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.simulation import simulate
from fedforge.train.program import LocalSGD
from tests.conftest import make_blobs, small_mlp


def test_step_norm_of_momentum_sgd_sums_the_step_coefficients() -> None:
    # Heavy ball rho = 0.5, 3 steps: gradients enter with 1 + rho + rho^2, 1 + rho, 1.
    assert float(step_norm(torch.tensor(3.0), 0.5)) == 1.75 + 1.5 + 1.0
    assert float(step_norm(torch.tensor(7.0), 0.0)) == 7.0


def test_normalized_average_on_a_hand_made_example() -> None:
    """Two clients, 2 and 4 steps, weights 1 and 3: x + tau_eff * sum p_i dy_i / tau_i."""
    algo = FedNova(local=LocalSGD(lr=0.1))
    deltas = [np.array([2.0, -4.0], np.float32), np.array([8.0, 4.0], np.float32)]
    rows = []
    for d, steps in zip(deltas, (2.0, 4.0), strict=True):
        arrays, own = algo.finish({"w": torch.from_numpy(d)}, {}, {}, torch.tensor(steps))
        assert own == {}
        rows.append({k: v.numpy() for k, v in arrays.items()})
    batch = RecordBatch(
        np.array([0, 1]),
        np.array([1, 3]),
        {k: np.stack([r[k] for r in rows]) for k in rows[0]},
    )
    acc = StreamingMean()
    acc.add(batch, batch.num_examples.astype(np.float64))
    aggregate = acc.result()
    p = np.array([0.25, 0.75])
    tau_eff = p @ [2.0, 4.0]  # 3.5
    assert aggregate.arrays[STEPS][0] == tau_eff
    state = algo.init({"w": np.array([1.0, 1.0], np.float32)})
    new = algo.server_update(state, aggregate, RoundContext(1, 2, 2))
    normalized = 0.25 * deltas[0] / 2 + 0.75 * deltas[1] / 4  # [1.75, -0.25]
    np.testing.assert_allclose(new.params["w"], 1.0 + tau_eff * normalized, rtol=1e-6)
    # FedAvg would move by the plain weighted mean [6.5, 2.0]: FedNova does not favour the
    # client that took more steps.
    assert not np.allclose(new.params["w"], 1.0 + 0.25 * deltas[0] + 0.75 * deltas[1])


def test_equal_step_counts_equal_fedavg() -> None:
    train = make_blobs(200, seed=0)
    parts = partition.iid(len(train), 10, np.random.default_rng(0))  # 20 examples each
    data = FederatedDataset(train, make_blobs(50, seed=0), parts)
    local = LocalSGD(lr=0.1, epochs=2, batch_size=6, momentum=0.5)
    kwargs = dict(rounds=2, clients_per_round=5, seed=2)
    avg = simulate(small_mlp(), data, FedAvg(local=local), **kwargs)  # type: ignore[arg-type]
    nova = simulate(small_mlp(), data, FedNova(local=local), **kwargs)  # type: ignore[arg-type]
    for name, value in avg.state.params.items():
        np.testing.assert_allclose(nova.state.params[name], value, rtol=1e-5, atol=1e-6)
