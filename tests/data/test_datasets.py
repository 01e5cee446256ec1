import numpy as np

from fedforge.data.datasets import load_digits, load_mnist5k, make_synthetic


def test_mnist5k_is_4000_train_1000_test_in_unit_range() -> None:
    train, test = load_mnist5k()
    assert train.x.shape == (4000, 784) and test.x.shape == (1000, 784)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert train.x.min() >= 0.0 and train.x.max() <= 1.0
    np.testing.assert_array_equal(np.bincount(test.y), np.full(10, 100))


def test_digits_split() -> None:
    train, test = load_digits()
    assert train.x.shape[1] == 64 and len(train) + len(test) == 1797


def test_synthetic_shapes_power_law_and_heterogeneity() -> None:
    synth = make_synthetic(1.0, 1.0, num_devices=30, seed=0)
    assert synth.train.x.shape[1] == 60 and synth.train.num_classes <= 10
    sizes = np.array([len(i) for i in synth.device_indices])
    assert len(sizes) == 30 and sizes.min() >= 40  # lognormal + 50, 80% kept for training
    assert sizes.max() > 5 * np.median(sizes)  # heavy tail
    # Non-IID: devices differ in their label distributions.
    shares = [np.bincount(synth.train.y[i], minlength=10) / len(i) for i in synth.device_indices]
    assert np.mean(np.std(shares, axis=0)) > 0.05
    again = make_synthetic(1.0, 1.0, num_devices=30, seed=0)
    np.testing.assert_array_equal(synth.train.x, again.train.x)
