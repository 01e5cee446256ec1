import copy

import numpy as np
import torch

from fedforge.algorithms.fedavg import FedAvg
from fedforge.core.records import FIT, Task
from fedforge.core.rng import RngStreams
from fedforge.data.federated import FederatedDataset
from fedforge.runtime.client_app import ClientApp
from fedforge.runtime.simulation import simulate
from fedforge.train.program import LocalSGD, batch_order
from fedforge.train.torch_model import TorchModel
from tests.conftest import make_blobs, small_mlp


def test_one_client_full_participation_equals_centralized_training() -> None:
    train, test = make_blobs(157, seed=0), make_blobs(50, seed=1)
    data = FederatedDataset(train, test, [np.arange(len(train))])
    model = small_mlp()
    local = LocalSGD(lr=0.1, epochs=3, batch_size=16, momentum=0.5, weight_decay=1e-3)
    rounds, seed = 4, 11

    result = simulate(
        model, data, FedAvg(local=local), rounds=rounds, clients_per_round=1, seed=seed
    )

    # Centralized: the same module, torch's own optimizer and the same batch order.
    central = copy.deepcopy(model)
    streams = RngStreams(seed)
    x, y = torch.from_numpy(train.x), torch.from_numpy(train.y)
    for r in range(1, rounds + 1):
        opt = torch.optim.SGD(central.parameters(), lr=0.1, momentum=0.5, weight_decay=1e-3)
        for batch in batch_order(len(train), 16, 3, streams.task_seed(r, 0)):
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

    app = ClientApp(algo, copy.deepcopy(model))
    global_params = TorchModel(model).get_params()
    streams = RngStreams(5)
    local_models, sizes = [], []
    for cid in range(10):
        task = Task(FIT, 1, cid, streams.task_seed(1, cid), global_params)
        record, state = app.handle(task, small_federated.client_data(cid), None)
        assert state is None and record.num_examples == small_federated.client_size(cid)
        local_models.append({k: global_params[k] + v for k, v in record.arrays.items()})
        sizes.append(small_federated.client_size(cid))
    w = np.array(sizes, np.float64) / sum(sizes)
    for name in global_params:
        expected = sum(
            wi * m[name].astype(np.float64) for wi, m in zip(w, local_models, strict=True)
        )
        np.testing.assert_allclose(result.state.params[name], expected, rtol=1e-5, atol=1e-6)


def test_full_batch_is_one_step_per_epoch(small_federated) -> None:  # type: ignore[no-untyped-def]
    """batch_size 0 is FedSGD's full batch, on the vectorized runtime too."""
    local = LocalSGD(lr=0.1, epochs=2, batch_size=0)
    assert local.num_steps(37) == 2
    kwargs = dict(rounds=2, clients_per_round=5, seed=2)
    seq = simulate(small_mlp(), small_federated, FedAvg(local=local), **kwargs)  # type: ignore[arg-type]
    vec = simulate(
        small_mlp(),
        small_federated,
        FedAvg(local=local),
        backend="vectorized",
        **kwargs,  # type: ignore[arg-type]
    )
    for name in seq.state.params:
        np.testing.assert_allclose(seq.state.params[name], vec.state.params[name], atol=1e-6)
