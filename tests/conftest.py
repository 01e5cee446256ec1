"""Shared fixtures: small, fast federated problems."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fedforge.data import partition
from fedforge.data.datasets import ArrayDataset
from fedforge.data.federated import FederatedDataset

torch.set_num_threads(1)


def make_blobs(n: int, dim: int = 8, classes: int = 3, seed: int = 0) -> ArrayDataset:
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, (classes, dim))
    y = rng.integers(0, classes, n)
    x = (centers[y] + rng.normal(size=(n, dim))).astype(np.float32)
    return ArrayDataset(x, y.astype(np.int64))


@pytest.fixture
def small_federated() -> FederatedDataset:
    train, test = make_blobs(300, seed=0), make_blobs(100, seed=1)
    parts = partition.dirichlet(train.y, 10, 0.5, np.random.default_rng(0))
    return FederatedDataset(train, test, parts)


def small_mlp(dim: int = 8, classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(dim, 16), torch.nn.ReLU(), torch.nn.Linear(16, classes)
    )


@pytest.fixture(scope="session")
def ray_cluster():  # type: ignore[no-untyped-def]
    """A local Ray for the tests of the Ray runtime (Ray comes with the test extra).

    Ray's raylet must register within 30 s; on two loaded cores it sometimes does not, so
    start-up is retried. A Ray that cannot start at all fails these tests: it is not a
    reason to pass them."""
    import ray

    for attempt in range(3):
        try:
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
            break
        except Exception:
            ray.shutdown()
            if attempt == 2:
                raise
    yield ray
    ray.shutdown()


@pytest.fixture
def isolated_imports():  # type: ignore[no-untyped-def]
    """Forget the project modules a test imports (a project's ``models``, ``data``...) and
    the project directories it puts on ``sys.path``, so later tests import their own."""
    import sys

    from fedforge.workload.imports import PROJECT_MODULES

    path, projects = list(sys.path), dict(PROJECT_MODULES)
    yield
    added = [d for d in sys.path if d not in path]  # the test's project directories
    for name, module in list(sys.modules.items()):
        where = getattr(module, "__file__", None) or ""
        if name in PROJECT_MODULES or any(where.startswith(d) for d in added):
            del sys.modules[name]
    sys.path[:] = path
    PROJECT_MODULES.clear()
    PROJECT_MODULES.update(projects)
