"""The shared benchmark workload, built once and handed to every contender.

mnist5k, Dirichlet(0.5) over N clients, the 2NN, E=1, B=10, lr=0.05. When N exceeds the
4,000 training digits (N=10,000), the training set is tiled so each client holds a few
examples. Saved as a plain ``.npz`` (no pickle) so the Flower environment, which does not
have fedforge, trains on exactly the same arrays, partition and initial weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedforge.core.rng import Purpose, RngStreams
from fedforge.data import partition
from fedforge.data.datasets import ArrayDataset, load_mnist5k
from fedforge.data.federated import FederatedDataset
from fedforge.train.models import fedavg_cnn, mlp, seeded
from fedforge.train.torch_model import TorchModel

SEED = 0
EPOCHS, BATCH, LR, ALPHA = 1, 10, 0.05, 0.5


@dataclass(frozen=True)
class Workload:
    data: FederatedDataset
    init: dict[str, np.ndarray]


def build(num_clients: int, model: str = "2nn") -> Workload:
    """The workload with the 2NN, or with the FedAvg paper's CNN (``model="cnn"``)."""
    train, test = load_mnist5k()
    tiles = -(-3 * num_clients // len(train))  # at least ~3 examples per client on average
    if tiles > 1:
        train = ArrayDataset(np.tile(train.x, (tiles, 1)), np.tile(train.y, tiles))
    rng = RngStreams(SEED).generator(Purpose.PARTITION)
    parts = partition.dirichlet(train.y, num_clients, ALPHA, rng)
    make = (lambda: fedavg_cnn((1, 28, 28), 10)) if model == "cnn" else (lambda: mlp(784, 10))
    module = seeded(make, RngStreams(SEED).int_seed(Purpose.INIT))
    return Workload(FederatedDataset(train, test, parts), TorchModel(module).get_params())


def save(workload: Workload, path: Path) -> None:
    d = workload.data
    np.savez(
        path,
        x_train=d.train.x,
        y_train=d.train.y,
        x_test=d.test.x,
        y_test=d.test.y,
        part_indices=np.concatenate(d.partition),
        part_offsets=np.cumsum([0] + [len(p) for p in d.partition]),
        **{f"init/{k}": v for k, v in workload.init.items()},
    )
