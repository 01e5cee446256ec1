"""A dataset split across clients, plus the server's held-out test set."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from fedforge.core.errors import DataError
from fedforge.data.checks import as_indices, check_disjoint
from fedforge.data.datasets import ArrayDataset
from fedforge.data.partition import Partition, label_counts


@dataclass(frozen=True)
class ClientData:
    """One client's local data: what it trains on, and its held-out split (if any) for
    federated evaluation. ``site`` is an opaque workload's object (an RL agent's
    environment): ``train`` and ``holdout`` are then one placeholder row each (the site's
    weight and its evaluation slot), the object goes to the workload's functions unread."""

    train: ArrayDataset
    holdout: ArrayDataset | None = None
    site: object | None = None

    @classmethod
    def of_object(cls, site: object, holdout: bool = True) -> ClientData:
        """An opaque site: its object, one placeholder training row, one held-out row."""
        return cls(placeholder(1), placeholder(1) if holdout else None, site)


def placeholder(rows: int) -> ArrayDataset:
    """``rows`` examples without features: an opaque site's weight in the runtimes' counts."""
    return ArrayDataset(np.zeros((rows, 0), np.float32), np.zeros(rows, np.int64))


@dataclass(frozen=True)
class FederatedDataset:
    """Train examples, one index array per client, and a central test set.

    ``holdout`` (optional) holds each client's held-out indices into ``train`` for federated
    evaluation; :meth:`with_holdout` makes it. Client data is materialized lazily, so ten
    thousand clients cost only their index arrays. Checked when made: every client has
    examples, indices are integers inside ``train`` (torch tensors and lists are converted),
    no example belongs to two clients (or twice to one), and train and test examples have
    the same shape and kind.
    """

    train: ArrayDataset
    test: ArrayDataset
    partition: Partition
    holdout: Partition | None = None
    sites: tuple[object, ...] | None = None  # an opaque workload's objects, one per client
    test_site: object | None = None  # ... and its central test object

    def __post_init__(self) -> None:
        if self.sites is not None and len(self.sites) != len(self.partition):
            raise DataError("sites needs one object per client")
        for name in ("train", "test"):
            if not isinstance(getattr(self, name), ArrayDataset):
                raise DataError(f"{name} must be an ArrayDataset(x, y)")
        train, test = self.train, self.test
        if len(test) and (
            train.x.shape[1:] != test.x.shape[1:] or train.x.dtype.kind != test.x.dtype.kind
        ):
            raise DataError(
                f"test examples are {test.x.dtype} of shape {test.x.shape[1:]}, training "
                f"examples {train.x.dtype} of shape {train.x.shape[1:]}: they must match"
            )
        if isinstance(self.partition, np.ndarray) and self.partition.ndim < 2:
            raise DataError("partition must be a list of index arrays, one per client")
        if not len(self.partition):
            raise DataError("a federated dataset needs at least one client")
        parts = [
            as_indices(idx, f"client {cid}'s indices", len(train))
            for cid, idx in enumerate(self.partition)
        ]
        for cid, idx in enumerate(parts):
            if len(idx) == 0:
                raise DataError(f"client {cid} has no examples")
        object.__setattr__(self, "partition", parts)
        every = parts
        if self.holdout is not None:
            if len(self.holdout) != len(parts):
                raise DataError("holdout needs one index array per client")
            held = [
                as_indices(idx, f"client {cid}'s held-out indices", len(train))
                for cid, idx in enumerate(self.holdout)
            ]
            object.__setattr__(self, "holdout", held)
            every = parts + held
        check_disjoint(every, len(train), "partition")

    def with_holdout(self, fraction: float, rng: np.random.Generator) -> FederatedDataset:
        """Move a random ``fraction`` of each client's examples (at least one when it has two
        or more) to its held-out split; a client keeps at least one training example."""
        if not 0 < fraction < 1:
            raise DataError(f"holdout fraction must be in (0, 1), got {fraction}")
        train_parts, held = [], []
        for idx in self.partition:
            perm = rng.permutation(idx)
            k = min(len(idx) - 1, max(1, round(fraction * len(idx)))) if len(idx) > 1 else 0
            held.append(np.sort(perm[:k]))
            train_parts.append(np.sort(perm[k:]))
        return replace(self, partition=train_parts, holdout=held)

    @property
    def num_clients(self) -> int:
        return len(self.partition)

    @property
    def num_classes(self) -> int:
        return max(self.train.num_classes, self.test.num_classes)

    def client(self, client_id: int) -> ArrayDataset:
        return self.train.subset(self.partition[client_id])

    def client_data(self, client_id: int) -> ClientData:
        held = None
        if self.holdout is not None and len(self.holdout[client_id]):
            held = self.train.subset(self.holdout[client_id])
        site = self.sites[client_id] if self.sites is not None else None
        return ClientData(self.client(client_id), held, site)

    @classmethod
    def of_objects(
        cls, sites: list[object], test: object | None, holdout: bool
    ) -> FederatedDataset:
        """An opaque workload's sites: one placeholder row each (and one held out each,
        with ``holdout``), the objects beside them."""
        n = len(sites)
        rows = 2 * n if holdout else n
        partition = [np.array([i]) for i in range(n)]
        held = [np.array([n + i]) for i in range(n)] if holdout else None
        return cls(placeholder(rows), placeholder(0), partition, held, tuple(sites), test)

    @property
    def opaque(self) -> bool:
        return self.sites is not None

    def client_size(self, client_id: int) -> int:
        return len(self.partition[client_id])

    def client_sizes(self) -> list[int]:
        """Training examples of every client."""
        return [len(idx) for idx in self.partition]

    def holdout_size(self, client_id: int) -> int:
        return 0 if self.holdout is None else len(self.holdout[client_id])

    def label_distribution(self) -> np.ndarray:
        """(clients x classes) example counts, for reports."""
        return label_counts(self.train.y, self.partition, self.num_classes)
