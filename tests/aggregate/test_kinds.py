import numpy as np
import pytest

from fedforge.aggregate.gather import CoordinateMedian
from fedforge.aggregate.kinds import StreamingMean, WeightedMean, weighted_mean
from fedforge.aggregate.robust import coordinate_median
from fedforge.core.errors import FedforgeError
from fedforge.core.records import Record, RecordBatch


def batch(updates: np.ndarray, ids: list[int] | None = None, **scalars: np.ndarray) -> RecordBatch:
    n = len(updates)
    return RecordBatch(
        client_ids=np.array(ids or list(range(n))),
        num_examples=np.ones(n, np.int64),
        arrays={"p": updates},
        scalars=dict(scalars),
    )


def test_golden_values() -> None:
    updates = np.array([[1.0, 2.0], [3.0, 6.0], [-1.0, 0.0]])
    # (1*[1,2] + 3*[3,6] + 4*[-1,0]) / 8 = [6, 20] / 8
    np.testing.assert_allclose(weighted_mean(updates, np.array([1, 3, 4])), [0.75, 2.5])
    acc = WeightedMean().accumulator()
    acc.add(batch(updates), np.array([1.0, 3.0, 4.0]))
    np.testing.assert_allclose(acc.result().arrays["p"], [0.75, 2.5])


def test_identical_updates_average_to_themselves() -> None:
    u = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    stream = StreamingMean()
    for w in [1, 7, 3, 100]:
        stream.add(Record(0, 1, {"p": u}).as_batch(), np.array([float(w)]))
    out = stream.result().arrays["p"]
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, u)


def test_batched_streaming_equals_pure_function_in_any_chunking() -> None:
    rng = np.random.default_rng(1)
    ups = rng.normal(size=(7, 3, 2)).astype(np.float32)
    ws = rng.integers(1, 50, 7).astype(np.float64)
    expected = weighted_mean(ups, ws)
    for cut in [1, 3, 7]:
        stream = StreamingMean()
        stream.add(batch(ups[:cut]), ws[:cut])
        if cut < 7:
            stream.add(batch(ups[cut:]), ws[cut:])
        result = stream.result()
        np.testing.assert_allclose(result.arrays["p"], expected, rtol=1e-5, atol=1e-7)
        assert result.count == 7 and result.total_weight == ws.sum()


def test_summed_scalars_are_summed_beside_the_arrays() -> None:
    stream = StreamingMean()
    stream.add(batch(np.zeros((3, 2)), **{"clip.clipped": np.array([1.0, 0.0, 1.0])}), np.ones(3))
    stream.add(batch(np.zeros((1, 2)), **{"clip.clipped": np.array([1.0])}), np.ones(1))
    assert stream.result().scalars == {"clip.clipped": 3.0}


def test_weight_cap_bounds_one_client_and_reports_it() -> None:
    ups = np.array([[0.0], [10.0]])
    acc = WeightedMean(max_weight=100.0).accumulator()
    acc.add(batch(ups, ids=[4, 9]), np.array([100.0, 1e7]))  # client 9 claims 10 million
    result = acc.result()
    np.testing.assert_allclose(result.arrays["p"], [5.0])
    assert result.downweighted == [9]


def test_streaming_rejects_bad_weights_and_empty_result() -> None:
    stream = StreamingMean()
    with pytest.raises(FedforgeError):
        stream.result()
    with pytest.raises(ValueError):
        stream.add(batch(np.zeros((1, 2))), np.array([0.0]))
    with pytest.raises(ValueError):
        weighted_mean(np.zeros((2, 2)), np.array([1.0]))


def test_median_equals_numpy_and_ignores_weights() -> None:
    rng = np.random.default_rng(2)
    ups = rng.normal(size=(9, 4, 3)).astype(np.float32)
    acc = CoordinateMedian().accumulator()
    acc.add(batch(ups[:4]), np.ones(4))
    acc.add(batch(ups[4:]), np.full(5, 1e6))
    np.testing.assert_allclose(acc.result().arrays["p"], np.median(ups, axis=0), rtol=1e-6)
    assert acc.result().arrays["p"].dtype == np.float32


def test_median_resists_a_minority_of_huge_values() -> None:
    honest = np.full((5, 3), 1.0)
    attackers = np.full((2, 3), 1e9)
    result = coordinate_median(np.concatenate([honest, attackers]))
    np.testing.assert_allclose(result.update, 1.0)


@pytest.mark.parametrize("rows", [1, 5])
def test_add_finite_sums_the_finite_rows_and_names_the_others(rows: int) -> None:
    """The mean checks finiteness in its summing pass: a NaN or an infinity in any row is
    refused with the array's name, the sum holds exactly the finite rows (and a float32 sum
    that overflows on finite rows falls back to float64, refusing nothing)."""
    rng = np.random.default_rng(0)
    updates = rng.standard_normal((rows, 6)).astype(np.float32)
    weights = np.arange(1.0, rows + 1)
    clean = StreamingMean()
    assert clean.add_finite(batch(updates), weights) == [None] * rows
    np.testing.assert_allclose(
        clean.result().arrays["p"], weighted_mean(updates, weights), rtol=1e-6
    )

    bad = updates.copy()
    bad[0, 2], bad[-1, 4] = np.nan, np.inf
    acc = StreamingMean()
    reasons = acc.add_finite(batch(bad), weights)
    assert reasons[0] == reasons[-1] == "p: NaN or infinite"
    assert reasons[1:-1] == [None] * (rows - 2)
    if rows > 2:
        kept = slice(1, rows - 1)
        np.testing.assert_allclose(
            acc.result().arrays["p"], weighted_mean(updates[kept], weights[kept]), rtol=1e-6
        )
    else:
        assert acc.count == 0

    huge = np.full((rows, 3), 3e38, np.float32)
    overflow = StreamingMean()
    assert overflow.add_finite(batch(huge), np.full(rows, 2.0)) == [None] * rows
    np.testing.assert_allclose(overflow.result().arrays["p"], np.full(3, 3e38), rtol=1e-6)
