"""User data is checked where it enters the API: what is unambiguous is converted, the rest
is refused with one DataError naming the problem (issue 21)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fedforge as ff
from fedforge.core.errors import DataError


def blobs(n: int = 60, dim: int = 4) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, n)
    x = rng.normal(size=(n, dim)) + y[:, None]  # float64
    return x, y


def test_float64_features_float_labels_and_torch_tensors_train_as_float32_and_int64() -> None:
    x, y = blobs()
    train = ff.ArrayDataset(torch.from_numpy(x), y.astype(np.float64))  # a tensor, float labels
    assert train.x.dtype == np.float32 and isinstance(train.x, np.ndarray)
    assert train.y.dtype == np.int64 and train.y.tolist() == y.tolist()
    test = ff.ArrayDataset(x[:20].tolist(), torch.from_numpy(y[:20]))  # nested lists
    parts = [torch.arange(0, 30), list(range(30, 60))]
    data = ff.FederatedDataset(train, test, parts)
    assert all(p.dtype == np.int64 for p in data.partition)
    result = ff.simulate(
        lambda: torch.nn.Linear(4, 3),
        data,
        ff.FedAvg(local=ff.LocalSGD(lr=0.1, epochs=1, batch_size=10)),
        rounds=1,
        clients_per_round=2,
        verbose=False,
    )
    assert np.isfinite(result.history[-1].test_loss)


def test_image_shaped_and_integer_token_features_are_kept() -> None:
    images = np.zeros((5, 1, 4, 4), np.float64)
    tokens = np.arange(15, dtype=np.int64).reshape(5, 3)
    assert ff.ArrayDataset(images, np.arange(5)).x.shape == (5, 1, 4, 4)
    kept = ff.ArrayDataset(tokens, np.arange(5))
    assert kept.x.dtype == np.int64 and kept.x is not None


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.array([[0.0, np.nan], [1.0, 2.0]]), [0, 1], "NaN or infinite values .* row 0"),
        (np.array([[0.0, 1.0], [np.inf, 2.0]]), [0, 1], "first row 1"),
        (np.array([[1e39, 0.0], [1.0, 2.0]]), [0, 1], "as float32"),  # overflows float32
        ([[0.0, 1.0], [2.0]], [0, 1], "ragged"),
        (np.zeros(4), [0, 1, 0, 1], "one row per example"),
        (np.array([["a", "b"]]), [0], "real numbers"),
        (np.zeros((2, 2)), [0.0, 0.5], r"integer class labels, but y\[1\] = 0.5"),
        (np.zeros((2, 2)), [0.0, np.nan], "integer class labels"),
        (np.zeros((2, 2)), [0, -1], "negative label"),
        (np.zeros((2, 2)), [[0], [1]], r"shape \(examples,\)"),
        (np.zeros((2, 2)), ["a", "b"], "labels must be integers"),
        (np.zeros((3, 2)), [0, 1], "3 rows but y has 2"),
    ],
)
def test_bad_arrays_are_refused_with_one_clear_error(x: object, y: object, message: str) -> None:
    with pytest.raises(DataError, match=message):
        ff.ArrayDataset(x, y)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([np.array([0, 1, 1]), np.array([2, 3])], "client 0 lists it 2 times"),
        ([np.array([0, 1]), np.array([1, 2])], "clients 0, 1 all hold it"),
        ([np.array([0, 1]), np.array([2, 9])], "index 9, outside the training set"),
        ([np.array([0, 1]), np.array([-1])], "index -1"),
        ([np.array([0.0, 1.0])], "must be integers"),
        ([np.array([True, False, True, False])], "boolean mask"),
        ([np.array([0, 1]), np.array([], np.int64)], "client 1 has no examples"),
        ([], "at least one client"),
    ],
)
def test_bad_partitions_are_refused(parts: list[np.ndarray], message: str) -> None:
    x, y = blobs(4)
    train = ff.ArrayDataset(x, y)
    with pytest.raises(DataError, match=message):
        ff.FederatedDataset(train, train, parts)


def test_a_holdout_overlapping_training_data_and_mismatched_test_shapes_are_refused() -> None:
    x, y = blobs(6)
    train = ff.ArrayDataset(x, y)
    parts = [np.array([0, 1, 2]), np.array([3, 4, 5])]
    with pytest.raises(DataError, match="example 2 is given out more than once"):
        ff.FederatedDataset(train, train, parts, holdout=[np.array([2]), np.array([], int)])
    other = ff.ArrayDataset(np.zeros((2, 5), np.float32), [0, 1])
    with pytest.raises(DataError, match=r"test examples are float32 of shape \(5,\)"):
        ff.FederatedDataset(train, other, parts)
    held = ff.FederatedDataset(train, train, parts).with_holdout(0.4, np.random.default_rng(0))
    assert held.holdout is not None and all(len(h) for h in held.holdout)
