import numpy as np
import pytest

from fedforge.aggregate.weighted_mean import StreamingMean, weighted_mean
from fedforge.core.errors import FedforgeError


def test_golden_values() -> None:
    updates = np.array([[1.0, 2.0], [3.0, 6.0], [-1.0, 0.0]])
    # (1*[1,2] + 3*[3,6] + 4*[-1,0]) / 8 = [6, 20] / 8
    np.testing.assert_allclose(weighted_mean(updates, [1, 3, 4]), [0.75, 2.5])


def test_weights_proportional_to_sample_counts() -> None:
    a, b = np.array([0.0]), np.array([10.0])
    # 30 vs 10 examples: the mean is 3/4 of the way to a.
    np.testing.assert_allclose(weighted_mean(np.stack([a, b]), [30, 10]), [2.5])
    # Scaling all weights does not change the mean.
    np.testing.assert_allclose(
        weighted_mean(np.stack([a, b]), [3, 1]), weighted_mean(np.stack([a, b]), [300, 100])
    )


def test_identical_updates_average_to_themselves() -> None:
    u = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    stream = StreamingMean()
    for w in [1, 7, 3, 100]:
        stream.add({"w": u}, w)
    out = stream.result()["w"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, u)


def test_streaming_equals_pure_function() -> None:
    rng = np.random.default_rng(1)
    ups = rng.normal(size=(6, 3, 2)).astype(np.float32)
    ws = rng.integers(1, 50, 6)
    stream = StreamingMean()
    for u, w in zip(ups, ws, strict=True):
        stream.add({"p": u}, float(w))
    np.testing.assert_allclose(stream.result()["p"], weighted_mean(ups, ws), rtol=1e-6)
    assert stream.count == 6 and stream.total_weight == ws.sum()


def test_streaming_rejects_bad_weights_and_empty_result() -> None:
    stream = StreamingMean()
    with pytest.raises(FedforgeError):
        stream.result()
    with pytest.raises(ValueError):
        stream.add({"p": np.zeros(2)}, 0.0)
    with pytest.raises(ValueError):
        weighted_mean(np.zeros((2, 2)), [1.0])
