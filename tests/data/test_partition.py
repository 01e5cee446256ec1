import numpy as np
import pytest

from fedforge.core.errors import DataError
from fedforge.data import partition

LABELS = np.repeat(np.arange(10), 200)  # 2,000 examples, 10 balanced labels


def _check_is_partition(parts: list[np.ndarray], n: int) -> None:
    assert sum(len(p) for p in parts) == n
    assert all(len(p) >= 1 for p in parts)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize(
    "make",
    [
        lambda rng: partition.iid(len(LABELS), 50, rng),
        lambda rng: partition.dirichlet(LABELS, 50, 0.1, rng),
        lambda rng: partition.dirichlet(LABELS, 50, 100.0, rng),
        lambda rng: partition.shards(LABELS, 50, 2, rng),
        lambda rng: partition.quantity_skew(len(LABELS), 50, 1.0, rng),
    ],
)
def test_every_partitioner_covers_the_data_once_and_feeds_every_client(make) -> None:  # type: ignore[no-untyped-def]
    parts = make(np.random.default_rng(3))
    _check_is_partition(parts, len(LABELS))
    again = make(np.random.default_rng(3))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def _mean_max_label_share(parts: list[np.ndarray]) -> float:
    counts = partition.label_counts(LABELS, parts, 10)
    return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))


def test_dirichlet_alpha_controls_skew() -> None:
    rng = np.random.default_rng(0)
    near_uniform = _mean_max_label_share(partition.dirichlet(LABELS, 20, 1000.0, rng))
    skewed = _mean_max_label_share(partition.dirichlet(LABELS, 20, 0.05, rng))
    # Balanced labels: an IID client's largest label is ~10-20% of its data.
    assert near_uniform < 0.2
    assert skewed > 0.7


def test_dirichlet_fills_empty_clients_at_extreme_skew() -> None:
    parts = partition.dirichlet(LABELS[:120], 100, 0.01, np.random.default_rng(0))
    _check_is_partition(parts, 120)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_shards_give_each_client_at_most_k_labels(k: int) -> None:
    labels = np.random.default_rng(1).integers(0, 10, 3000)  # unbalanced labels
    parts = partition.shards(labels, 100, k, np.random.default_rng(0))
    _check_is_partition(parts, len(labels))
    assert max(len(np.unique(labels[p])) for p in parts) <= k


def test_quantity_skew_is_heavy_tailed() -> None:
    parts = partition.quantity_skew(10_000, 100, 1.0, np.random.default_rng(0))
    sizes = np.sort([len(p) for p in parts])
    assert sizes[-1] > 5 * np.median(sizes)


def test_too_many_clients_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="only 5"):
        partition.iid(5, 10, np.random.default_rng(0))
