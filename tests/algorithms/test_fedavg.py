import copy

import numpy as np
import torch

from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.rng import Purpose, RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.simulation import simulate
from fedforge.train.local_sgd import LocalSGD, batch_order
from fedforge.train.torch_model import TorchModel
from tests.conftest import make_blobs, small_mlp


def test_one_client_full_participation_equals_centralized_training() -> None:
    train, test = make_blobs(157, seed=0), make_blobs(50, seed=1)
    data = FederatedDataset(train, test, [np.arange(len(train))])
    model = small_mlp()
    local = LocalSGD(lr=0.1, epochs=3, batch_size=16, momentum=0.5)
    rounds, seed = 4, 11

    result = simulate(
        model, data, FedAvg(local=local), rounds=rounds, clients_per_round=1, seed=seed
    )

    # Centralized: the same module, optimizer and batch order, no federation at all.
    central = copy.deepcopy(model)
    streams = RngStreams(seed)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    for r in range(1, rounds + 1):
        opt = torch.optim.SGD(central.parameters(), lr=0.1, momentum=0.5)
        for batch in batch_order(len(train), 16, 3, streams.generator(Purpose.CLIENT, r, 0)):
            idx = torch.from_numpy(batch)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(central(x[idx]), y[idx]).backward()
            opt.step()
    expected = TorchModel(central).get_params()
    for name, arr in expected.items():
        np.testing.assert_allclose(result.state.params[name], arr, rtol=1e-5, atol=1e-6)


def test_fedavg_round_is_example_weighted_mean_of_client_models(small_federated) -> None:  # type: ignore[no-untyped-def]
    model = small_mlp()
    algo = FedAvg(local=LocalSGD(lr=0.1, epochs=1, batch_size=8))
    result = simulate(model, small_federated, algo, rounds=1, clients_per_round=10, seed=5)

    start = TorchModel(copy.deepcopy(model))
    global_params = start.get_params()
    streams = RngStreams(5)
    local_models, sizes = [], []
    for cid in range(10):
        res = algo.client_update(
            cid,
            start,
            global_params,
            small_federated.client(cid),
            streams.generator(Purpose.CLIENT, 1, cid),
        )
        local_models.append({k: global_params[k] + v for k, v in res.update.items()})
        sizes.append(small_federated.client_size(cid))
    w = np.array(sizes, np.float64) / sum(sizes)
    for name in global_params:
        expected = sum(
            wi * m[name].astype(np.float64) for wi, m in zip(w, local_models, strict=True)
        )
        np.testing.assert_allclose(result.state.params[name], expected, rtol=1e-5, atol=1e-6)
