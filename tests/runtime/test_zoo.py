"""The model zoo's CNNs are vectorized through vmap (convolutions included) and train exactly
as the sequential runtime does."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

import fedforge as ff
from fedforge.config import load_config
from fedforge.experiment import build_model
from fedforge.runtime.backends import resolve_backend
from fedforge.train.models import fedavg_cnn, residual_cnn
from tests.runtime.test_backends import assert_same


def digit_images(clients: int) -> ff.FederatedDataset:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.images[:, None] / 16.0).astype(np.float32)  # (N, 1, 8, 8)
    y = digits.target.astype(np.int64)
    train, test = ff.ArrayDataset(x[:120], y[:120]), ff.ArrayDataset(x[1500:1560], y[1500:1560])
    parts = ff.partition.dirichlet(train.y, clients, 0.5, np.random.default_rng(0))
    return ff.FederatedDataset(train, test, parts)


@pytest.mark.parametrize(
    "make",
    [
        lambda: fedavg_cnn((1, 8, 8), 10, channels=(4, 8), dense=16),
        lambda: residual_cnn((1, 8, 8), 10, channels=(4, 8)),
    ],
    ids=["fedavg_cnn", "residual_cnn"],
)
def test_cnns_vectorized_equal_sequential(make) -> None:  # type: ignore[no-untyped-def]
    data = digit_images(4)
    algorithm = ff.FedAvg(local=ff.LocalSGD(lr=0.1, epochs=2, batch_size=8))
    runs = {
        backend: ff.simulate(
            make, data, algorithm, rounds=2, clients_per_round=3, seed=1, backend=backend, threads=1
        )
        for backend in ("sequential", "vectorized")
    }
    assert runs["vectorized"].backend == "vectorized"
    assert_same(runs["sequential"], runs["vectorized"], atol=2e-5)


def test_the_fedavg_papers_cnn_has_its_parameter_count_and_runs_on_flat_mnist() -> None:
    config = load_config(None, ['model.name="cnn"', "partition.num_clients=10"])
    model = build_model(
        config,
        ff.FederatedDataset(
            ff.ArrayDataset(np.zeros((2, 784), np.float32), np.array([0, 9])),
            ff.ArrayDataset(np.zeros((1, 784), np.float32), np.array([0])),
            [np.array([0]), np.array([1])],
        ),
    )
    assert sum(p.numel() for p in model.parameters()) == 1_663_370  # McMahan et al. 2017
    assert model(torch.zeros(3, 784)).shape == (3, 10)


def test_auto_leaves_convolutions_on_the_cpu_to_one_client_at_a_time(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cnn = fedavg_cnn((1, 8, 8), 10, channels=(4, 8), dense=16)
    program = ff.FedAvg().program()
    with caplog.at_level(logging.INFO, logger="fedforge"):
        assert resolve_backend("auto", program, cnn, device="cpu") == "workers"
    assert "grouped convolution" in caplog.text
    assert resolve_backend("auto", program, cnn, device="cuda") == "vectorized"
    assert resolve_backend("vectorized", program, cnn, device="cpu") == "vectorized"
