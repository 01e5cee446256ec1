"""A dataset split across clients, plus the server's held-out test set."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedforge.core.errors import DataError
from fedforge.data.datasets import ArrayDataset
from fedforge.data.partition import Partition, label_counts


@dataclass(frozen=True)
class FederatedDataset:
    """Train examples, one index array per client, and a central test set.

    Client data is materialized lazily by :meth:`client`, so ten thousand clients cost
    only their index arrays.
    """

    train: ArrayDataset
    test: ArrayDataset
    partition: Partition

    def __post_init__(self) -> None:
        if not self.partition:
            raise DataError("a federated dataset needs at least one client")
        for cid, idx in enumerate(self.partition):
            if len(idx) == 0:
                raise DataError(f"client {cid} has no examples")
            if idx.min() < 0 or idx.max() >= len(self.train):
                raise DataError(f"client {cid} has indices outside the training set")

    @property
    def num_clients(self) -> int:
        return len(self.partition)

    @property
    def num_classes(self) -> int:
        return max(self.train.num_classes, self.test.num_classes)

    def client(self, client_id: int) -> ArrayDataset:
        idx = self.partition[client_id]
        return ArrayDataset(self.train.x[idx], self.train.y[idx])

    def client_size(self, client_id: int) -> int:
        return len(self.partition[client_id])

    def label_distribution(self) -> np.ndarray:
        """(clients x classes) example counts, for reports."""
        return label_counts(self.train.y, self.partition, self.num_classes)
