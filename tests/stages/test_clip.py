import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from fedforge.aggregate.gather import CoordinateMedian
from fedforge.aggregate.kinds import Aggregate, WeightedMean
from fedforge.core.errors import ConfigError
from fedforge.core.records import RecordBatch, RecordSpec
from fedforge.runtime.simulation import simulate
from fedforge.stages.base import StageChain
from fedforge.stages.clip import FixedClip, row_norms
from tests.conftest import small_mlp


def batch_of(a: np.ndarray, b: np.ndarray) -> RecordBatch:
    n = len(a)
    return RecordBatch(np.arange(n), np.ones(n, np.int64), {"a": a, "b": b})


def test_clip_scales_records_over_all_their_arrays_and_counts_them() -> None:
    a = np.array([[3.0, 0.0], [0.3, 0.0]], np.float32)
    b = np.array([[4.0], [0.4]], np.float32)  # norms 5 and 0.5
    stage = FixedClip(1.0)
    out = stage.encode(batch_of(a, b), stage.broadcast(stage.init_state()), [0, 0])
    np.testing.assert_allclose(out.arrays["a"], [[0.6, 0.0], [0.3, 0.0]], rtol=2e-6)
    np.testing.assert_allclose(out.arrays["b"], [[0.8], [0.4]], rtol=2e-6)
    assert np.all(row_norms(out) <= 1.0)  # never past the bound, float32 rounding included
    np.testing.assert_array_equal(out.scalars["clip.clipped"], [1.0, 0.0])
    assert out.arrays["a"].dtype == np.float32
    _, metrics = stage.finish_round(
        stage.init_state(), Aggregate({}, {"clip.clipped": 1.0}, 2, 2.0)
    )
    assert metrics == {"clip.clipped": 1.0, "clip.norm": 1.0}


@settings(max_examples=50, deadline=None)
@given(
    arrays(np.float32, (4, 6), elements=st.floats(-1e6, 1e6, width=32)),
    st.floats(1e-3, 1e3),
)
def test_clipping_bounds_every_contribution(values: np.ndarray, norm: float) -> None:
    stage = FixedClip(norm)
    out = stage.encode(
        batch_of(values[:, :4], values[:, 4:]), {"clip.norm": norm}, [0] * len(values)
    )
    assert np.all(row_norms(out) <= norm * (1 + 1e-5))


def test_chain_refuses_out_of_order_stages_naming_both() -> None:
    class Compress:
        name, position, commutes_with_sum = "q8", "compress", False

    with pytest.raises(ConfigError, match=r"'clip'.*cannot follow.*'q8'"):
        StageChain([Compress(), FixedClip(1.0)])  # type: ignore[list-item]


def test_secure_sum_refuses_stages_that_do_not_commute() -> None:
    class Compress:
        name, position, commutes_with_sum = "q8", "compress", False

    class SecureSum:
        kind, name = "secure_sum", "secagg"

    StageChain([FixedClip(1.0)]).check(SecureSum())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"q8.*does not commute"):
        StageChain([FixedClip(1.0), Compress()]).check(SecureSum())  # type: ignore[list-item, arg-type]
    StageChain([Compress()]).check(WeightedMean())  # type: ignore[list-item]
    StageChain([Compress()]).check(CoordinateMedian())  # type: ignore[list-item]


def test_clip_metric_reaches_the_history(small_federated) -> None:  # type: ignore[no-untyped-def]
    result = simulate(
        small_mlp(), small_federated, rounds=2, clients_per_round=5, stages=[FixedClip(1e-3)]
    )
    assert result.history[1].metrics["clip.clipped"] == 5.0
    assert result.history[1].metrics["clip.norm"] == 1e-3
    big = simulate(
        small_mlp(), small_federated, rounds=1, clients_per_round=5, stages=[FixedClip(1e6)]
    )
    assert big.history[1].metrics["clip.clipped"] == 0.0


def test_wire_spec_adds_the_summed_scalar() -> None:
    spec = StageChain([FixedClip(1.0)]).wire_spec(RecordSpec({}))
    assert spec.scalars == ("clip.clipped",)


def test_the_server_reapplies_the_bound_and_trusts_no_odd_bit() -> None:
    """A client that skipped clipping, or reports clip.clipped = 1e300, gains nothing."""
    stage = FixedClip(1.0)
    a = np.array([[30.0, 40.0], [0.3, 0.4]], np.float32)  # the first row was never clipped
    b = np.zeros((2, 1), np.float32)
    cheat = batch_of(a, b).with_scalars(**{"clip.clipped": np.array([0.0, 1e300])})
    out = stage.decode(cheat, stage.init_state())
    np.testing.assert_allclose(row_norms(out), [1.0, 0.5], rtol=1e-6)
    np.testing.assert_array_equal(out.scalars["clip.clipped"], [1.0, 1.0])
